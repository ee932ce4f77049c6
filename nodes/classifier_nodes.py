"""Classifier nodes: sockets only; loading lives in ``classifiers``."""
from __future__ import annotations

import os

import folder_paths

from ..classifiers.comfy_classifier import FOLDER_KEY, ComfyClassifier, register_folder
from ..classifiers.timm_classifier import load_timm_classifier, read_sidecar
from ..guiders.config import GFCGInputError
from ._api import ClassifierType, io

register_folder()


def _architecture_of(path: str) -> str:
    """The architecture a file declares (safetensors metadata or sidecar), without reading tensors."""
    meta = {}
    if path.lower().endswith(".safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
        except Exception:
            return ""  # unreadable: reported by the loader with the reason
    return meta.get("architecture") or read_sidecar(path).get("architecture") or ""


class LoadImageClassifier(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GFCGLoadImageClassifier",
            display_name="Load Image Classifier (timm)",
            category="sampling/gfcg",
            description="Loads a timm image classifier from a local .safetensors (or weights-only .pt/.pth) file in "
                        "models/gfcg_classifiers for GFCG. The architecture comes from the file's metadata, a "
                        "sidecar <file>.json, or the architecture input; preprocessing from timm's data config; "
                        "ImageNet-1k class names for 1000-class heads.",
            inputs=[
                io.Combo.Input("classifier_name", options=folder_paths.get_filename_list(FOLDER_KEY),
                               tooltip="Weights file in models/gfcg_classifiers (or models/classifiers): "
                                       ".safetensors, or a .pt/.pth state dict (read weights-only)."),
                io.String.Input("architecture", default="", optional=True,
                                tooltip="timm architecture name, e.g. 'resnet50'. Leave empty to use the one stored "
                                        "in the file's metadata or its sidecar JSON."),
            ],
            outputs=[ClassifierType.Output(display_name="CLASSIFIER",
                                           tooltip="The classifier, managed by ComfyUI like a model.")],
        )

    @classmethod
    def validate_inputs(cls, classifier_name, architecture=""):
        path = folder_paths.get_full_path(FOLDER_KEY, classifier_name) if classifier_name else None
        if path is None:
            roots = ", ".join(folder_paths.get_folder_paths(FOLDER_KEY))
            return f"classifier_name: file {classifier_name!r} not found in {roots}"
        if not (architecture or "").strip() and not _architecture_of(path):
            return (f"architecture: {classifier_name!r} names no architecture in its metadata or a sidecar JSON; "
                    "set the architecture input to a timm model name (e.g. 'resnet50')")
        return True

    @classmethod
    def execute(cls, classifier_name, architecture="") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER_KEY, classifier_name)
        try:
            clf = load_timm_classifier(path, architecture or "", name=os.path.basename(path))
        except GFCGInputError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(ComfyClassifier(clf))
