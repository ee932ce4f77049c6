"""Zero-shot image classifiers from open_clip checkpoints on disk (framework-free).

An open_clip architecture (a name from ``open_clip.list_models()``) plus a local checkpoint
(.safetensors, or a weights-only .pt/.pth/.bin: checked with ``torch.load(weights_only=True)``, then
loaded by open_clip's own ``load_checkpoint``), a class list and prompt templates become an :class:`ImageClassifier`:
the head is open_clip's ``build_zero_shot_classifier`` (its tokenizer, template averaging and
normalisation), the logits are ``exp(logit_scale) * normalize(encode_image(x)) @ head (+ bias)``,
exactly the model's own image-text logits. The text tower is dropped after the head is built.

Results are cached per (checkpoint file and its mtime/size, architecture, class list, templates).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..guiders.config import GFCGInputError
from .timm_classifier import DataConfig, ImageClassifier
from .vocab import imagenet_class_names

CLIP_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin")
TEMPLATE_SETS = ("openai imagenet (80)", "simple imagenet (18)", "a photo of a {}.", "custom")
CLASS_SOURCES = ("imagenet-1k", "list", "file")
MAX_TEMPLATES = 1000
MAX_TEMPLATE_CHARS = 300
_CACHE: "OrderedDict[tuple, ImageClassifier]" = OrderedDict()
_CACHE_SIZE = 4


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


def _data_config(model) -> DataConfig:
    from open_clip.transform import PreprocessCfg

    from open_clip.model import get_model_preprocess_cfg

    cfg = PreprocessCfg(**get_model_preprocess_cfg(model))
    size = cfg.size if isinstance(cfg.size, (tuple, list)) else (cfg.size, cfg.size)
    return DataConfig(input_size=(3, int(size[0]), int(size[1])), interpolation=cfg.interpolation, crop_pct=1.0,
                      crop_mode="squash" if cfg.resize_mode == "squash" else "center",
                      mean=tuple(cfg.mean), std=tuple(cfg.std))


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
                              name: str = "") -> ImageClassifier:
    """A zero-shot :class:`ImageClassifier` over ``class_names`` (its vocabulary); prompts use
    ``prompt_names`` (default: each name's first synonym) in every template."""
    import open_clip

    base = os.path.basename(path)
    if not os.path.isfile(path):
        raise GFCGInputError(f"clip_name: file not found: {path!r}")
    if os.path.splitext(path)[1].lower() not in CLIP_EXTENSIONS:
        raise GFCGInputError(f"clip_name: {base!r} is not one of {', '.join(CLIP_EXTENSIONS)} (nothing else is "
                             f"loaded, for safety)")
    if architecture not in open_clip.list_models():
        raise GFCGInputError(f"architecture: {architecture!r} is not an open_clip architecture "
                             f"(open_clip.list_models(), e.g. ViT-B-32)")
    class_names = list(class_names)
    prompts = list(prompt_names) if prompt_names is not None else [prompt_name(n) for n in class_names]
    if len(prompts) != len(class_names):
        raise GFCGInputError(f"class names: {len(class_names)} names but {len(prompts)} prompt names")
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size, architecture, tuple(class_names), tuple(prompts),
           tuple(templates))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
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
    try:
        tokenizer = open_clip.get_tokenizer(architecture)
    except Exception as e:   # e.g. a Hugging Face tokenizer that is not on this machine
        raise GFCGInputError(f"architecture: the tokenizer of {architecture!r} is not available offline "
                             f"({str(e).splitlines()[0][:200]})") from None
    _check_prompt_lengths(tokenizer, architecture, prompts, templates)
    with torch.no_grad():
        head = open_clip.build_zero_shot_classifier(model, tokenizer, prompts, list(templates),
                                                    num_classes_per_batch=10, device="cpu", use_tqdm=False)
    net = ZeroShotNet(model.visual, head, model.logit_scale, getattr(model, "logit_bias", None))
    clf = ImageClassifier(net, _data_config(model), class_names, name=name or f"{base} ({architecture})")
    _CACHE[key] = clf
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return clf


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
