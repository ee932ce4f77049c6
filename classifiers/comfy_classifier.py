"""ComfyUI glue for classifiers: the models folder and the ModelPatcher that lets ComfyUI's model
management load / offload the classifier together with the diffusion model."""
from __future__ import annotations

import copy
import os

import torch

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

from ..common.comfy_folders import ensure_folder
from ..common.folders import bundled_folders
from .clip_classifier import CLIP_EXTENSIONS
from .timm_classifier import WEIGHT_EXTENSIONS, ImageClassifier

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


def classifier_patcher(classifier: ImageClassifier):
    """The classifier's ModelPatcher: ComfyUI's plain (never dynamic) patcher, since the gradient
    guider deep-copies the module. ``cached_patcher_init`` names a factory, as ComfyUI's core loaders
    do, so that newer ComfyUI can make one per GPU for its multi-GPU split (``deepclone_multigpu``)."""
    patcher = comfy.model_patcher.ModelPatcher(classifier, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    patcher.cached_patcher_init = (classifier_patcher_copy, (classifier,))
    return patcher


def classifier_patcher_copy(classifier: ImageClassifier, disable_dynamic: bool = False):
    """A patcher of a copy of ``classifier`` (ComfyUI's reload factory; ``disable_dynamic``, passed
    for non-dynamic delegates, has nothing to do: the pack's patchers are never dynamic)."""
    with torch.inference_mode(False):
        return classifier_patcher(copy.deepcopy(classifier))


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
