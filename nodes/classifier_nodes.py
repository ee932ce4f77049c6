"""Classifier nodes: sockets only; loading lives in ``classifiers``."""
from __future__ import annotations

import os

import folder_paths

from ..classifiers.clip_classifier import (CLASS_SOURCES, INTERPOLATIONS, RESIZE_MODES, TEMPLATE_SETS, class_names_for,
                                           load_zero_shot_classifier, preprocess_config, templates_for)
from ..classifiers.comfy_classifier import (CLASS_LIST_FOLDER_KEY, CLIP_FOLDER_KEY, FOLDER_KEY,
                                            WEIGHT_DTYPE_CHOICES, ComfyClassifier, register_folder,
                                            resolve_weight_dtype)
from ..classifiers.timm_classifier import load_timm_classifier, read_sidecar
from ..classifiers.vocab import imagenet_class_names
from ..common.errors import GFCGInputError
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


WEIGHT_DTYPE_TOOLTIP = ("Precision of the classifier's weights. auto: fp16 on a GPU that runs fp16 well (ComfyUI's "
                        "own rule), fp32 on the CPU. fp16 halves its memory and agrees with fp32 on the top class "
                        "of 99.9 % of the testbed's images (bf16: 99.6 %; docs/performance.md).")


def _weight_dtype_input():
    return io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPE_CHOICES), default="auto", optional=True,
                          tooltip=WEIGHT_DTYPE_TOOLTIP)


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
                _weight_dtype_input(),
            ],
            outputs=[ClassifierType.Output(display_name="CLASSIFIER",
                                           tooltip="The classifier, managed by ComfyUI like a model.")],
        )

    @classmethod
    def validate_inputs(cls, classifier_name, architecture="", weight_dtype="auto"):
        path = folder_paths.get_full_path(FOLDER_KEY, classifier_name) if classifier_name else None
        if path is None:
            roots = ", ".join(folder_paths.get_folder_paths(FOLDER_KEY))
            return f"classifier_name: file {classifier_name!r} not found in {roots}"
        if not (architecture or "").strip() and not _architecture_of(path):
            return (f"architecture: {classifier_name!r} names no architecture in its metadata or a sidecar JSON; "
                    "set the architecture input to a timm model name (e.g. 'resnet50')")
        return True

    @classmethod
    def execute(cls, classifier_name, architecture="", weight_dtype="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER_KEY, classifier_name)
        try:
            clf = load_timm_classifier(path, architecture or "", name=os.path.basename(path),
                                       dtype=resolve_weight_dtype(weight_dtype))
        except GFCGInputError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith("architecture:") else f"classifier_name: {msg}") from None
        return io.NodeOutput(ComfyClassifier(clf))


NO_FILE = "(none)"


NO_OPEN_CLIP = "(open_clip is not installed)"


def _clip_architectures():
    try:
        import open_clip
    except ImportError:  # the rest of the pack works without it
        return [NO_OPEN_CLIP]
    return list(open_clip.list_models())


class LoadZeroShotClassifier(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        archs = _clip_architectures()
        return io.Schema(
            node_id="GFCGLoadZeroShotClassifier",
            display_name="Load Zero-Shot Classifier (open_clip)",
            category="sampling/gfcg",
            description="Turns a local open_clip checkpoint into an image classifier over any list of classes: the "
                        "class names go through prompt templates and open_clip's own tokenizer and text tower into a "
                        "zero-shot head (open_clip's build_zero_shot_classifier); logits are the model's image-text "
                        "logits. Images are preprocessed as open_clip does for the checkpoint's family (the "
                        "pretrained tag's mean, std and resize mode: SigLIP 0.5 and squash, OpenAI CLIP mean/std and "
                        "shortest side). Plugs into GFCG and gradient guidance like a timm classifier. Heads are "
                        "cached per checkpoint, class list, templates and preprocessing.",
            inputs=[
                io.Combo.Input("clip_name", options=folder_paths.get_filename_list(CLIP_FOLDER_KEY),
                               tooltip="open_clip checkpoint in models/gfcg_clip: .safetensors, or a weights-only "
                                       ".pt/.pth/.bin (nothing else is unpickled)."),
                io.Combo.Input("architecture", options=archs, default="ViT-B-32" if "ViT-B-32" in archs else archs[0],
                               tooltip="The checkpoint's open_clip architecture (open_clip.list_models()); OpenAI "
                                       "weights need the -quickgelu variants."),
                io.Combo.Input("class_source", options=list(CLASS_SOURCES), default="imagenet-1k",
                               tooltip="imagenet-1k: the 1000 ImageNet classes (timm's names as the vocabulary, the "
                                       "CLIP authors' cleaned names in the prompts); list: the class_list input; "
                                       "file: a .txt file from models/gfcg_class_lists (one class per line)."),
                io.String.Input("class_list", default="", multiline=True, optional=True,
                                tooltip="For class_source = list: one class per line (commas add synonyms: the first "
                                        "name goes into the prompts, all of them select the class)."),
                io.Combo.Input("class_file", options=[NO_FILE] + folder_paths.get_filename_list(CLASS_LIST_FOLDER_KEY),
                               default=NO_FILE, optional=True,
                               tooltip="For class_source = file: a .txt file in models/gfcg_class_lists, one class "
                                       "per line ('#' starts a comment)."),
                io.Combo.Input("templates", options=list(TEMPLATE_SETS), default="openai imagenet (80)", optional=True,
                               tooltip="Prompt templates averaged per class: open_clip's 80 OpenAI ImageNet "
                                       "templates, its 18 simple ones, the single 'a photo of a {}.', or custom."),
                io.String.Input("custom_templates", default="a photo of a {}.", multiline=True, optional=True,
                                tooltip="For templates = custom: one template per line, {} is the class name."),
                io.String.Input("pretrained", default="", optional=True,
                                tooltip="The checkpoint's open_clip pretrained tag (open_clip.list_pretrained_tags_by_"
                                        "model), e.g. 'webli' (SigLIP), 'dfn5b', 'openai', 'laion2b_s34b_b79k': its "
                                        "mean, std, interpolation and resize mode preprocess the images (nothing is "
                                        "downloaded). Empty: the values all the architecture's tags share; an error "
                                        "lists the tags where they differ (e.g. ViT-H-14: LAION/MetaCLIP vs DFN-5B)."),
                io.String.Input("image_mean", default="", optional=True,
                                tooltip="Overrides the normalisation mean: three numbers (R, G, B) or one for all, "
                                        "e.g. '0.5, 0.5, 0.5'. Empty: from pretrained / the architecture."),
                io.String.Input("image_std", default="", optional=True,
                                tooltip="Overrides the normalisation std (numbers above 0), e.g. '0.5, 0.5, 0.5'. "
                                        "Empty: from pretrained / the architecture."),
                io.Combo.Input("resize_mode", options=list(RESIZE_MODES), default="auto", optional=True,
                               tooltip="Overrides how images reach the tower's input size: shortest (short side to "
                                       "the size, centre crop; OpenAI/LAION) or squash (both sides to the size, no "
                                       "crop; SigLIP, DFN-5B). auto: from pretrained / the architecture."),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="auto", optional=True,
                               tooltip="Overrides the resize filter (bicubic for most open_clip checkpoints). auto: "
                                       "from pretrained / the architecture."),
                _weight_dtype_input(),
            ],
            outputs=[ClassifierType.Output(display_name="CLASSIFIER",
                                           tooltip="The zero-shot classifier, managed by ComfyUI like a model.")],
        )

    @classmethod
    def validate_inputs(cls, clip_name, class_source, class_list="", class_file=NO_FILE, templates="openai imagenet (80)",
                        custom_templates="", pretrained=None, image_mean=None, image_std=None, resize_mode=None,
                        interpolation=None, **_other):
        architecture = _other.get("architecture")
        if architecture == NO_OPEN_CLIP:
            return "architecture: open_clip is not installed; pip install open_clip_torch"
        preprocessing = (architecture, pretrained, image_mean, image_std, resize_mode, interpolation)
        if None not in preprocessing:   # linked (or omitted) values are checked when the node runs
            try:
                preprocess_config(*preprocessing)
            except GFCGInputError as e:
                return str(e)
        if folder_paths.get_full_path(CLIP_FOLDER_KEY, clip_name) is None:
            roots = ", ".join(folder_paths.get_folder_paths(CLIP_FOLDER_KEY))
            return f"clip_name: file {clip_name!r} not found in {roots}"
        try:
            templates_for(templates, custom_templates)
            if class_source == "list":
                class_names_for("list", class_list)
        except GFCGInputError as e:
            return str(e)
        if class_source == "file" and (class_file in (None, "", NO_FILE)
                                       or folder_paths.get_full_path(CLASS_LIST_FOLDER_KEY, class_file) is None):
            return "class_file: choose a .txt file from models/gfcg_class_lists for class_source = file"
        return True

    @classmethod
    def execute(cls, clip_name, architecture, class_source, class_list="", class_file=NO_FILE,
                templates="openai imagenet (80)", custom_templates="", pretrained="", image_mean="", image_std="",
                resize_mode="auto", interpolation="auto", weight_dtype="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(CLIP_FOLDER_KEY, clip_name)
        file_path = None
        if class_source == "file" and class_file not in (None, "", NO_FILE):
            file_path = folder_paths.get_full_path(CLASS_LIST_FOLDER_KEY, class_file)
        try:
            names, prompts = class_names_for(class_source, class_list, file_path)
            clf = load_zero_shot_classifier(path, architecture, names, templates_for(templates, custom_templates),
                                            prompt_names=prompts, name=f"{clip_name} ({architecture})",
                                            pretrained=pretrained, image_mean=image_mean, image_std=image_std,
                                            resize_mode=resize_mode, interpolation=interpolation,
                                            dtype=resolve_weight_dtype(weight_dtype))
        except GFCGInputError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(ComfyClassifier(clf))


def _imagenet_options():
    return [f"{i}: {name}" for i, name in enumerate(imagenet_class_names())]


class ImageNetClass(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        opts = _imagenet_options()
        return io.Schema(
            node_id="GFCGImageNetClass",
            display_name="ImageNet Class",
            category="sampling/gfcg",
            description="Pick an ImageNet-1k class from a searchable list (type to filter, e.g. 'retriever'); its "
                        "index goes to a desired_class or fixed_reference_class input (any ImageNet classifier: "
                        "timm 1000-class heads or the zero-shot loader with imagenet-1k) or to an EDM2 class label.",
            inputs=[io.Combo.Input("class_name", options=opts, default=opts[207],
                                   tooltip="The ImageNet class, as 'index: names' (timm's ImageNet-1k names).")],
            outputs=[io.String.Output(display_name="class", tooltip="The class index as text, e.g. '207' (what the "
                                                                    "class inputs of this pack accept)."),
                     io.Int.Output(display_name="index", tooltip="The class index 0..999.")],
        )

    @classmethod
    def execute(cls, class_name) -> io.NodeOutput:
        idx = int(str(class_name).split(":", 1)[0])
        return io.NodeOutput(str(idx), idx)
