"""Zero-shot image classifiers from open_clip checkpoints on disk (framework-free).

An open_clip architecture (a name from ``open_clip.list_models()``) plus a local checkpoint
(.safetensors, or a weights-only .pt/.pth/.bin: checked with ``torch.load(weights_only=True)``, then
loaded by open_clip's own ``load_checkpoint``), a class list and prompt templates become an :class:`ImageClassifier`:
the head is open_clip's ``build_zero_shot_classifier`` (its tokenizer, template averaging and
normalisation), the logits are ``exp(logit_scale) * normalize(encode_image(x)) @ head (+ bias)``,
exactly the model's own image-text logits. The text tower is dropped after the head is built.

Preprocessing is the checkpoint family's, as open_clip's eval transform gives it for
``create_model_and_transforms(architecture, pretrained=TAG)`` (:func:`preprocess_config`): the
pretrained tag's mean, std, interpolation and resize mode (SigLIP: 0.5 mean/std and ``squash``;
DFN-5B: ``squash``; OpenAI/LAION: CLIP mean/std and ``shortest``). Without a tag, the values every
tag of the architecture shares, or an error naming ``pretrained`` where its tags differ; explicit
mean/std/resize mode/interpolation override. Nothing is downloaded: only the tables are read.
:class:`ZeroShotClassifier` applies it to tensors exactly as torchvision's Resize/CenterCrop do.

The text head (the class embeddings, logit scale and bias: small tensors) is cached per (checkpoint
file and its mtime/size, architecture, class list, templates), so a loader that runs again skips the
text tower. No module is cached: every load builds its own image tower, which ComfyUI's model
management owns (offloads, frees) like any other model once the loader's output is dropped.
"""
from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from dataclasses import asdict
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..common.errors import GFCGInputError
from .timm_classifier import DataConfig, ImageClassifier, straight_through_clamp
from .vocab import imagenet_class_names

CLIP_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin")
TEMPLATE_SETS = ("openai imagenet (80)", "simple imagenet (18)", "a photo of a {}.", "custom")
CLASS_SOURCES = ("imagenet-1k", "list", "file")
MAX_TEMPLATES = 1000
MAX_TEMPLATE_CHARS = 300
RESIZE_MODES = ("auto", "shortest", "squash")          # open_clip's inference resize modes the pack runs
INTERPOLATIONS = ("auto", "bicubic", "bilinear")
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
_HEAD_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()   # key -> (head, logit_scale, logit_bias): tensors only
_HEAD_CACHE_SIZE = 8


def templates_for(choice: str, custom: str = "") -> Tuple[str, ...]:
    """Prompt templates: open_clip's ImageNet sets, the single CLIP default, or one per line of
    ``custom`` (each must contain '{}', replaced by the class name)."""
    from open_clip import zero_shot_metadata as meta

    if choice == "openai imagenet (80)":
        return tuple(meta.OPENAI_IMAGENET_TEMPLATES)
    if choice == "simple imagenet (18)":
        return tuple(meta.SIMPLE_IMAGENET_TEMPLATES)
    if choice == "a photo of a {}.":
        return ("a photo of a {}.",)
    if choice != "custom":
        raise GFCGInputError(f"templates: {choice!r} is not one of {', '.join(TEMPLATE_SETS)}")
    lines = tuple(t.strip() for t in (custom or "").splitlines() if t.strip())
    if not lines:
        raise GFCGInputError("custom_templates: give one template per line, e.g. 'a photo of a {}.'")
    if len(lines) > MAX_TEMPLATES:
        raise GFCGInputError(f"custom_templates: {len(lines)} templates is too many (at most {MAX_TEMPLATES}; "
                             "open_clip's largest set has 80)")
    long = [t for t in lines if len(t) > MAX_TEMPLATE_CHARS]
    if long:
        raise GFCGInputError(f"custom_templates: a template of {len(long[0])} characters is too long (at most "
                             f"{MAX_TEMPLATE_CHARS}; CLIP text towers read about 77 tokens): {long[0][:40]!r}...")
    bad = [t for t in lines if "{}" not in t]
    if bad:
        raise GFCGInputError(f"custom_templates: every template needs '{{}}' for the class name; {bad[0]!r} has none")
    return lines


def parse_class_list(text: str, input_name: str = "class_list") -> List[str]:
    """One class per line (blank lines and '#' comments skipped); names must be unique."""
    names = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(names) < 2:
        raise GFCGInputError(f"{input_name}: give at least two class names, one per line")
    seen = set()
    for n in names:
        if n.lower() in seen:
            raise GFCGInputError(f"{input_name}: class {n!r} appears twice")
        seen.add(n.lower())
    return names


def read_class_file(path: str) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return parse_class_list(f.read(), f"class_file {os.path.basename(path)!r}")
    except OSError as e:
        raise GFCGInputError(f"class_file: cannot read {os.path.basename(path)!r} ({e.strerror})") from None


def imagenet_prompt_names() -> Tuple[str, ...]:
    """The CLIP authors' cleaned ImageNet-1k names (open_clip), same order as timm's classes."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)


def prompt_name(name: str) -> str:
    """The name a prompt uses for a vocabulary entry: its first comma-separated synonym."""
    return name.split(",")[0].strip() or name.strip()


class ZeroShotNet(torch.nn.Module):
    """Image tower + fixed text head: logits = exp(logit_scale) * normalize(visual(x)) @ W (+ b)."""

    def __init__(self, visual: torch.nn.Module, head: torch.Tensor, logit_scale: torch.Tensor, logit_bias=None):
        super().__init__()
        self.visual = visual
        self.register_buffer("head", head.detach().clone())                  # [D, K]
        self.register_buffer("scale", logit_scale.detach().exp().reshape(()).clone())
        self.register_buffer("bias", None if logit_bias is None else logit_bias.detach().reshape(()).clone())

    def forward(self, x):
        f = F.normalize(self.visual(x), dim=-1)
        logits = self.scale * f @ self.head.to(f.dtype)
        return logits if self.bias is None else logits + self.bias


def _channels(value: Union[str, Sequence[float], None], input_name: str, positive: bool = False):
    """Three per-channel numbers from '0.5, 0.5, 0.5' / '0.5' / a sequence; None when empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    example = "'0.5, 0.5, 0.5' (SigLIP) or '0.48145466, 0.4578275, 0.40821073' (OpenAI CLIP)"
    try:
        parts = [float(v) for v in (re.split(r"[\s,;]+", value.strip().strip("()[]")) if isinstance(value, str)
                                    else list(value)) if v != ""]
    except (TypeError, ValueError):
        raise GFCGInputError(f"{input_name}: {value!r} is not a list of numbers; give three (R, G, B) or one for "
                             f"all channels, e.g. {example}") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise GFCGInputError(f"{input_name}: give three numbers (R, G, B) or one for all channels, not {len(parts)}; "
                             f"e.g. {example}")
    if not all(math.isfinite(v) for v in parts) or (positive and not all(v > 0 for v in parts)):
        raise GFCGInputError(f"{input_name}: {value!r} must be finite numbers{' above 0' if positive else ''}")
    return tuple(parts)


def _family_cfg(cfg: Dict[str, Any]) -> Tuple:
    mean, std = cfg["mean"], cfg["std"]
    mean = tuple(float(v) for v in (mean if isinstance(mean, (list, tuple)) else (mean,) * 3))
    std = tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else (std,) * 3))
    interp = cfg.get("interpolation") or "bicubic"
    return mean, std, "bicubic" if interp == "random" else interp, cfg.get("resize_mode") or "shortest"


def _describe(cfg: Tuple) -> str:
    from open_clip.constants import INCEPTION_MEAN, OPENAI_DATASET_MEAN

    mean = {tuple(OPENAI_DATASET_MEAN): "OpenAI CLIP", tuple(INCEPTION_MEAN): "0.5"}.get(cfg[0], str(cfg[0]))
    return f"mean/std {mean}, {cfg[3]}, {cfg[2]}"


def preprocess_config(architecture: str, pretrained: str = "", image_mean=None, image_std=None,
                      resize_mode: str = "auto", interpolation: str = "auto") -> Dict[str, Any]:
    """The checkpoint family's preprocessing ({mean, std, interpolation, resize_mode}), from open_clip's
    tables without downloading, as ``create_model(architecture, pretrained=TAG)`` sets it: open_clip's
    defaults (``PreprocessCfg``: OpenAI mean/std, bicubic, shortest) under the pretrained tag's config
    (``get_pretrained_cfg``). With no tag, the config all the architecture's tags share (an error
    naming ``pretrained`` when they differ in anything the explicit values leave open; an
    architecture without tags keeps the defaults). Explicit values override last. (Built-in model
    configs carry no preprocessing: open_clip's model classes refuse a ``preprocess_cfg`` key.)"""
    import open_clip
    from open_clip.transform import PreprocessCfg

    def merge(cfg, overlay):   # open_clip's merge_preprocess_dict, for the keys the pack runs
        return {**cfg, **{k: v for k, v in (overlay or {}).items() if k in PREPROCESS_KEYS and v is not None}}

    if architecture not in open_clip.list_models():
        raise GFCGInputError(f"architecture: {architecture!r} is not an open_clip architecture "
                             f"(open_clip.list_models(), e.g. ViT-B-32)")
    if resize_mode not in RESIZE_MODES:
        raise GFCGInputError(f"resize_mode: {resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
    if interpolation not in INTERPOLATIONS:
        raise GFCGInputError(f"interpolation: {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    override = {"mean": _channels(image_mean, "image_mean"), "std": _channels(image_std, "image_std", positive=True),
                "resize_mode": None if resize_mode == "auto" else resize_mode,
                "interpolation": None if interpolation == "auto" else interpolation}
    base = merge({}, asdict(PreprocessCfg()))
    tags = open_clip.list_pretrained_tags_by_model(architecture)
    tag = (pretrained or "").strip()
    if tag:
        if not open_clip.is_pretrained_cfg(architecture, tag):
            known = f"its tags: {', '.join(tags)}" if tags else "it has none; leave pretrained empty"
            raise GFCGInputError(f"pretrained: {tag!r} is not an open_clip pretrained tag of {architecture} ({known})")
        tags = [tag]
    families: Dict[Tuple, List[str]] = {}
    for t in tags or [""]:
        cfg = merge(base, open_clip.get_pretrained_cfg(architecture, t) if t else {})
        families.setdefault(_family_cfg(merge(cfg, override)), []).append(t)
    if len(families) > 1:
        groups = "; ".join(f"{', '.join(ts[:4])}{f' and {len(ts) - 4} more' if len(ts) > 4 else ''}: {_describe(f)}"
                           for f, ts in families.items())
        raise GFCGInputError(f"pretrained: {architecture} checkpoints differ in preprocessing ({groups}); set "
                             f"pretrained to the tag of this checkpoint (or set image_mean, image_std, resize_mode "
                             f"and interpolation)")
    mean, std, interp, mode = next(iter(families))
    if mode not in ("shortest", "squash"):
        raise GFCGInputError(f"resize_mode: {architecture} preprocesses with resize mode {mode!r}, which this pack "
                             f"does not run; set resize_mode to shortest or squash")
    if interp not in ("bicubic", "bilinear"):
        raise GFCGInputError(f"interpolation: {architecture} preprocesses with {interp!r}; set interpolation to "
                             f"bicubic or bilinear")
    return {"mean": mean, "std": std, "interpolation": interp, "resize_mode": mode}


def _data_config(model, preprocess: Dict[str, Any] = None) -> DataConfig:
    """The classifier's data config: the model's input size, the family's preprocessing
    (``preprocess``, from :func:`preprocess_config`; default the model's own, open_clip's defaults)."""
    from open_clip.model import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg

    cfg = PreprocessCfg(**get_model_preprocess_cfg(model))
    size = cfg.size if isinstance(cfg.size, (tuple, list)) else (cfg.size, cfg.size)
    p = preprocess or dict(zip(PREPROCESS_KEYS, _family_cfg(asdict(cfg))))
    return DataConfig(input_size=(3, int(size[0]), int(size[1])), interpolation=p["interpolation"], crop_pct=1.0,
                      crop_mode="squash" if p["resize_mode"] == "squash" else "center",
                      mean=tuple(p["mean"]), std=tuple(p["std"]))


class ZeroShotClassifier(ImageClassifier):
    """An :class:`ImageClassifier` whose preprocessing is open_clip's eval transform on tensors, to the
    pixel: ``squash`` resizes to the input size; ``shortest`` is torchvision's ``Resize(size)``
    (long side ``int(size * long / short)``) and ``CenterCrop`` (offsets ``round((h - size) / 2)``),
    or open_clip's ``ResizeKeepRatio`` (bicubic, rounded) for a non-square input size: the sizes are
    timm's rule at crop_pct 1 (``ImageClassifier.resize_size``). Bicubic overshoot is clamped to
    [0, 1] as on open_clip's PIL path (straight-through for gradients)."""

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        dc = self.data_config
        th, tw = int(dc.input_size[1]), int(dc.input_size[2])
        x = images.float()
        h, w = x.shape[-2:]
        mode = dc.interpolation if dc.interpolation in ("bilinear", "bicubic") else "bicubic"
        size = self.resize_size(h, w)
        if dc.crop_mode != "squash" and th != tw:
            mode = "bicubic"
        if tuple(size) != (h, w):
            x = F.interpolate(x, size=tuple(size), mode=mode, align_corners=False, antialias=True)
            x = straight_through_clamp(x)
        sh, sw = x.shape[-2:]
        if (sh, sw) != (th, tw):
            top, left = int(round((sh - th) / 2.0)), int(round((sw - tw) / 2.0))
            x = x[..., top:top + th, left:left + tw]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def _check_weights_only(path: str) -> None:
    """Refuse a .pt/.pth/.bin that ``torch.load(weights_only=True)`` cannot read, before open_clip
    sees it: open_clip's ``load_checkpoint`` retries a failed weights-only load with a bare
    ``torch.load``, which unpickles without restriction on torch < 2.6 or under
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``. Zip files are memory-mapped, so the tensors are not read."""
    if path.lower().endswith(".safetensors"):
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format


def _check_prompt_lengths(tokenizer, architecture: str, prompts: Sequence[str], templates: Sequence[str]) -> None:
    """Every prompt must fit the text tower's context: open_clip's tokenizer cuts longer ones, which
    could cut the class name off and give several classes the same text."""
    encode, ctx = getattr(tokenizer, "encode", None), getattr(tokenizer, "context_length", None)
    if encode is None or not ctx:
        return
    longest = max(prompts, key=len)
    for t in templates:                                  # open_clip's sets are functions of the class name
        text = t(longest) if callable(t) else t.replace("{}", longest)
        n = len(encode(text)) + 2                          # + start and end tokens
        if n > ctx:
            raise GFCGInputError(f"custom_templates: {text[:60]!r}... is {n} tokens; the text tower of {architecture} "
                                 f"reads {ctx}, so the class name could be cut off")


def load_zero_shot_classifier(path: str, architecture: str, class_names: Sequence[str],
                              templates: Sequence[str], prompt_names: Sequence[str] = None,
                              name: str = "", pretrained: str = "", image_mean=None, image_std=None,
                              resize_mode: str = "auto", interpolation: str = "auto",
                              dtype: torch.dtype = torch.float32) -> ImageClassifier:
    """A zero-shot :class:`ImageClassifier` over ``class_names`` (its vocabulary); prompts use
    ``prompt_names`` (default: each name's first synonym) in every template. Preprocessing:
    :func:`preprocess_config` of (``architecture``, ``pretrained``, the explicit values). The head
    is computed in fp32; the image tower and head are then cast to ``dtype``."""
    import open_clip

    base = os.path.basename(path)
    if not os.path.isfile(path):
        raise GFCGInputError(f"clip_name: file not found: {path!r}")
    if os.path.splitext(path)[1].lower() not in CLIP_EXTENSIONS:
        raise GFCGInputError(f"clip_name: {base!r} is not one of {', '.join(CLIP_EXTENSIONS)} (nothing else is "
                             f"loaded, for safety)")
    preprocess = preprocess_config(architecture, pretrained, image_mean, image_std, resize_mode, interpolation)
    class_names = list(class_names)
    prompts = list(prompt_names) if prompt_names is not None else [prompt_name(n) for n in class_names]
    if len(prompts) != len(class_names):
        raise GFCGInputError(f"class names: {len(class_names)} names but {len(prompts)} prompt names")
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size, architecture, tuple(class_names), tuple(prompts),
           tuple(templates))
    try:
        _check_weights_only(path)
        model = open_clip.create_model(architecture, pretrained=None)
        open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    except GFCGInputError:
        raise
    except Exception as e:  # corrupt file, mismatched architecture, pickle refused by weights_only
        raise GFCGInputError(f"clip_name: {base!r} could not be loaded as open_clip {architecture!r}: "
                             f"{str(e).splitlines()[0][:300]}") from None
    model.eval()
    if key in _HEAD_CACHE:
        _HEAD_CACHE.move_to_end(key)
        head, logit_scale, logit_bias = _HEAD_CACHE[key]
    else:
        head = text_head(model, architecture, prompts, templates)
        logit_scale, logit_bias = model.logit_scale.detach().clone(), getattr(model, "logit_bias", None)
        logit_bias = None if logit_bias is None else logit_bias.detach().clone()
        _HEAD_CACHE[key] = (head, logit_scale, logit_bias)
        while len(_HEAD_CACHE) > _HEAD_CACHE_SIZE:
            _HEAD_CACHE.popitem(last=False)
    net = ZeroShotNet(model.visual, head, logit_scale, logit_bias).to(dtype)
    return ZeroShotClassifier(net, _data_config(model, preprocess), class_names, name=name or f"{base} ({architecture})")


def text_head(model, architecture: str, prompts: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """open_clip's zero-shot head [D, K] for ``prompts`` in every template (its tokenizer, template
    averaging and normalisation), computed on the CPU with the model's text tower."""
    import open_clip

    try:
        tokenizer = open_clip.get_tokenizer(architecture)
    except Exception as e:   # e.g. a Hugging Face tokenizer that is not on this machine
        raise GFCGInputError(f"architecture: the tokenizer of {architecture!r} is not available offline "
                             f"({str(e).splitlines()[0][:200]})") from None
    _check_prompt_lengths(tokenizer, architecture, prompts, templates)
    with torch.no_grad():
        return open_clip.build_zero_shot_classifier(model, tokenizer, prompts, list(templates),
                                                    num_classes_per_batch=10, device="cpu", use_tqdm=False)


def class_names_for(source: str, class_list: str = "", class_file_path: str = None) -> Tuple[List[str], List[str]]:
    """(vocabulary names, prompt names) for a class source: ImageNet-1k (timm's names as the
    vocabulary, the CLIP authors' cleaned names in the prompts), a typed list, or a text file."""
    if source == "imagenet-1k":
        return list(imagenet_class_names()), list(imagenet_prompt_names())
    if source == "list":
        names = parse_class_list(class_list)
    elif source == "file":
        if not class_file_path:
            raise GFCGInputError("class_file: choose a .txt file from models/gfcg_class_lists for class_source = file")
        names = read_class_file(class_file_path)
    else:
        raise GFCGInputError(f"class_source: {source!r} is not one of {', '.join(CLASS_SOURCES)}")
    return names, [prompt_name(n) for n in names]
