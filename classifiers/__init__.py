"""Image classifiers for guidance (framework-free): timm loading, preprocessing, vocabularies."""
from .timm_classifier import DataConfig, ImageClassifier, load_timm_classifier, read_weights, save_timm_classifier
from .vocab import imagenet_class_names, resolve_class

__all__ = ["DataConfig", "ImageClassifier", "load_timm_classifier", "read_weights", "save_timm_classifier",
           "imagenet_class_names", "resolve_class"]
