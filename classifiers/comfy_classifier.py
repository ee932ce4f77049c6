"""ComfyUI glue for classifiers: the models folder and the ModelPatcher that lets ComfyUI's model
management load / offload the classifier together with the diffusion model."""
from __future__ import annotations

import os

import torch

import comfy.model_management as mm
import folder_paths

from ..common.comfy_folders import ensure_folder
from ..common.comfy_patcher import patcher_class
from ..common.grad_copy import plain_resident_copy
from ..common.folders import bundled_folders
from .clip_classifier import CLIP_EXTENSIONS
from .timm_classifier import WEIGHT_DTYPES, WEIGHT_EXTENSIONS, ImageClassifier, weight_dtype_of

FOLDER_KEY = "gfcg_classifiers"
CLIP_FOLDER_KEY = "gfcg_clip"
CLASS_LIST_FOLDER_KEY = "gfcg_class_lists"


def register_folder() -> None:
    """``models/gfcg_classifiers`` (and ``models/classifiers``, whose built-in key lists only files
    without an extension) under the pack's own key, for .safetensors / .pt / .pth files;
    ``models/gfcg_clip`` for open_clip checkpoints and ``models/gfcg_class_lists`` for class lists."""
    paths = [os.path.join(folder_paths.models_dir, FOLDER_KEY), os.path.join(folder_paths.models_dir, "classifiers"),
             *bundled_folders(FOLDER_KEY)]  # the pack's own testbed classifiers
    ensure_folder(FOLDER_KEY, paths, WEIGHT_EXTENSIONS)
    ensure_folder(CLIP_FOLDER_KEY, [os.path.join(folder_paths.models_dir, CLIP_FOLDER_KEY)], CLIP_EXTENSIONS)
    ensure_folder(CLASS_LIST_FOLDER_KEY, [os.path.join(folder_paths.models_dir, CLASS_LIST_FOLDER_KEY)], (".txt",))


WEIGHT_DTYPE_CHOICES = ("auto",) + tuple(WEIGHT_DTYPES)


def resolve_weight_dtype(name: str) -> torch.dtype:
    """The classifier's weight dtype for a ``weight_dtype`` choice. auto: fp16 where ComfyUI would
    run fp16 on its device (``should_use_fp16``: a GPU that runs it well), else fp32 (the CPU)."""
    if name in (None, "", "auto"):
        return torch.float16 if mm.should_use_fp16(mm.get_torch_device()) else torch.float32
    return weight_dtype_of(name)


def classifier_patcher(classifier: ImageClassifier):
    """The classifier's ModelPatcher, of the class ComfyUI's own loaders use (:func:`patcher_class`),
    so that a classifier in a load never changes how ComfyUI frees memory for the dynamic models
    beside it. Whatever ComfyUI then loads (all, part, or nothing of it), the forward runs on the
    load device (``timm_classifier.run_on_device``). ``cached_patcher_init`` names a factory, as
    ComfyUI's core loaders do, for its multi-GPU split and non-dynamic delegates."""
    patcher = patcher_class()(classifier, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    patcher.cached_patcher_init = (classifier_patcher_copy, (classifier,))
    return patcher


def classifier_patcher_copy(classifier: ImageClassifier, disable_dynamic: bool = False):
    """A patcher of a copy of ``classifier`` (ComfyUI's reload factory); ``disable_dynamic`` asks for
    the plain patcher (ComfyUI's non-dynamic delegate)."""
    # ComfyUI's runtime objects (DynamicVRAM's pinned host buffers on the module) are never duplicated
    clone = plain_resident_copy(classifier, mm.unet_offload_device())
    if disable_dynamic:
        patcher = patcher_class(disable_dynamic=True)(clone, load_device=mm.get_torch_device(),
                                                      offload_device=mm.unet_offload_device())
        patcher.cached_patcher_init = (classifier_patcher_copy, (classifier,))
        return patcher
    return classifier_patcher(clone)


def classify(comfy_classifier, pixels: torch.Tensor) -> torch.Tensor:
    """The classifier's logits for ``pixels`` on ComfyUI's load device of the classifier (not the
    device of its first weight, which a partial load may have left on the offload device)."""
    dev = comfy_classifier.patcher.load_device
    return comfy_classifier.classifier(pixels if pixels.device == dev else pixels.to(dev))


class ComfyClassifier:
    """The value on a CLASSIFIER socket: the framework-free classifier and its ModelPatcher."""

    def __init__(self, classifier: ImageClassifier):
        self.classifier = classifier
        self.patcher = classifier_patcher(classifier)

    @property
    def class_names(self):
        return self.classifier.class_names

    def __repr__(self):
        return f"ComfyClassifier({self.classifier.name!r}, {self.classifier.num_classes} classes)"
