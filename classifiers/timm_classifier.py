"""Image classifiers from local files: timm architectures, weights from safetensors (or a
``.pt``/``.pth`` state dict read with ``torch.load(weights_only=True)``), preprocessing from timm's
data config. No unrestricted unpickling, ever.

Where the architecture comes from, in order: the ``architecture`` argument (node input), the
safetensors metadata key ``architecture``, a sidecar JSON next to the file (``<file>.json`` or
``<stem>.json``) with an ``architecture`` entry. Metadata / sidecar may also carry
``num_classes``, ``class_names`` (a JSON list) and ``data_config`` (a JSON object overriding
timm's input_size / interpolation / crop_pct / crop_mode / mean / std).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..common.errors import GFCGInputError
from .vocab import imagenet_class_names

WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".pth")


# --------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------

def read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(state_dict, metadata) of a weights file. ``.safetensors`` is read with safetensors;
    ``.pt``/``.pth`` only with ``torch.load(weights_only=True)`` (plain tensors and containers)."""
    if not os.path.isfile(path):
        raise GFCGInputError(f"classifier file not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise GFCGInputError(f"classifier file {os.path.basename(path)!r} is empty")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise GFCGInputError(f"classifier file {os.path.basename(path)!r} is not a readable safetensors file ({e})") from None
        return sd, meta
    if ext in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise GFCGInputError(f"classifier file {os.path.basename(path)!r} could not be read as a weights-only "
                                 f"torch file (nothing else is loaded, for safety): {str(e).splitlines()[0]}") from None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
            raise GFCGInputError(f"classifier file {os.path.basename(path)!r} does not hold a state dict of tensors")
        return obj, {}
    raise GFCGInputError(f"classifier file {os.path.basename(path)!r}: extension {ext!r} is not allowed; "
                         f"use one of {', '.join(WEIGHT_EXTENSIONS)}")


def read_sidecar(path: str) -> Dict:
    """The JSON sidecar of a weights file, if any: ``<file>.json`` or ``<stem>.json``."""
    for cand in (path + ".json", os.path.splitext(path)[0] + ".json"):
        if os.path.isfile(cand):
            try:
                with open(cand, "r", encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise GFCGInputError(f"classifier sidecar {os.path.basename(cand)!r} is not valid JSON ({e})") from None
            if not isinstance(data, dict):
                raise GFCGInputError(f"classifier sidecar {os.path.basename(cand)!r} must hold a JSON object")
            return data
    return {}


def _meta_value(meta: Dict[str, str], sidecar: Dict, key: str):
    if key in meta:
        v = meta[key]
        if key in ("class_names", "data_config", "num_classes"):
            try:
                return json.loads(v)
            except ValueError:
                raise GFCGInputError(f"safetensors metadata {key!r} must be JSON, got {v[:60]!r}") from None
        return v
    return sidecar.get(key)


# --------------------------------------------------------------------------------------------
# the classifier
# --------------------------------------------------------------------------------------------

def run_on_device(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` on ``x``'s device whatever part of ``module`` lives elsewhere: the parameters and
    buffers that are not on that device (a partial load left them on the offload device, or the
    model was offloaded) are cast there for this forward only (``torch.func.functional_call``),
    as ComfyUI's own layers cast offloaded weights on the fly; the module itself is not changed.
    With everything in place this is the plain forward."""
    dev = x.device
    away = {n: t for n, t in list(module.named_parameters()) + list(module.named_buffers())
            if t is not None and t.device != dev}
    if not away:
        return module(x)
    moved = {n: t.to(dev, non_blocking=True) for n, t in away.items()}
    return torch.func.functional_call(module, moved, (x,), strict=False)


def straight_through_clamp(x: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """x clamped to [lo, hi] in value, with the gradient of the identity: a gradient taken through
    it is the gradient with respect to the clamped image (nothing is zeroed where x overshoots)."""
    return x + (x.clamp(lo, hi) - x).detach()


@dataclass
class DataConfig:
    """timm's evaluation preprocessing: resize the short side to input/crop_pct, centre-crop, normalise."""

    input_size: Tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_timm(cls, cfg: Dict) -> "DataConfig":
        keys = cls.__dataclass_fields__
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in keys})


class ImageClassifier(torch.nn.Module):
    """A classifier over images in [0, 1] ([B, 3, H, W]); ``forward`` preprocesses and returns logits."""

    def __init__(self, net: torch.nn.Module, data_config: DataConfig, class_names: Sequence[str], name: str = ""):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.data_config = data_config
        self.class_names = list(class_names)
        self.name = name
        dc = data_config
        self.register_buffer("mean", torch.tensor(dc.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(dc.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def resize_size(self, h: int, w: int) -> Tuple[int, int]:
        """The size (sh, sw) timm's eval transform resizes an h x w image to before its centre crop,
        with (Sh, Sw) = (floor(th / crop_pct), floor(tw / crop_pct)): squash: (Sh, Sw); a square
        scale size: torchvision's Resize(Sh), the short side to Sh and the long side to
        int(Sh * long / short); else timm's ResizeKeepRatio, (round(h / r), round(w / r)) with
        r = min(h / Sh, w / Sw)."""
        dc = self.data_config
        th, tw = int(dc.input_size[1]), int(dc.input_size[2])
        s_h, s_w = int(math.floor(th / dc.crop_pct)), int(math.floor(tw / dc.crop_pct))
        if dc.crop_mode == "squash":
            return s_h, s_w
        if s_h == s_w:
            short, long = min(h, w), max(h, w)
            new_long = int(s_h * long / short)
            return (new_long, s_h) if w <= h else (s_h, new_long)
        ratio = min(h / s_h, w / s_w)
        return round(h / ratio), round(w / ratio)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """timm's eval transform on a batch: short side -> floor(size / crop_pct), centre crop to
        ``input_size`` at torchvision CenterCrop's offset ``int(round((s - t) / 2))`` (Python's round,
        half to even: a margin of 11 starts the crop at 6, one of 13 at 6), normalise with mean/std.
        ``images``: [B, 3, H, W] in [0, 1]."""
        dc = self.data_config
        th, tw = int(dc.input_size[1]), int(dc.input_size[2])
        x = images.float()
        h, w = x.shape[-2:]
        sh, sw = self.resize_size(h, w)
        if (sh, sw) != (h, w):
            mode = dc.interpolation if dc.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
            x = F.interpolate(x, size=(sh, sw), mode=mode, antialias=mode != "nearest",
                              align_corners=False if mode != "nearest" else None)
            x = straight_through_clamp(x)   # bicubic overshoot
        top, left = int(round((sh - th) / 2.0)), int(round((sw - tw) / 2.0))
        x = x[..., top:top + th, left:left + tw]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (fp32) of ``images`` ([B, 3, H, W] in [0, 1]), computed on ``images``' device in
        the weights' dtype (:func:`run_on_device`: a partly offloaded classifier still runs there)."""
        x = self.preprocess(images).to(self.dtype)
        return run_on_device(self.net, x).float()


def _head_classes(model, sd: Dict[str, torch.Tensor]) -> Optional[int]:
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = [head] if isinstance(head, str) else list(head or [])
    for h in heads:
        w = sd.get(f"{h}.weight")
        if w is not None:
            return int(w.shape[0])
    return None


WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a ``weight_dtype`` choice (fp32 | fp16 | bf16)."""
    if name not in WEIGHT_DTYPES:
        raise GFCGInputError(f"weight_dtype: {name!r} is not one of {', '.join(WEIGHT_DTYPES)} (or auto)")
    return WEIGHT_DTYPES[name]


def load_timm_classifier(path: str, architecture: str = "", name: str = "",
                         dtype: torch.dtype = torch.float32) -> ImageClassifier:
    """Build a timm classifier from a local weights file; see the module docstring for the sources
    of architecture, class count, class names and data config. Loads with ``strict=True``, then
    casts the weights to ``dtype`` (the input is cast to it too; logits come back in fp32)."""
    import timm

    sd, meta = read_weights(path)
    sidecar = read_sidecar(path)
    arch = (architecture or "").strip() or _meta_value(meta, sidecar, "architecture")
    base = os.path.basename(path)
    if not arch:
        raise GFCGInputError(f"architecture: {base!r} names no architecture (no 'architecture' in its safetensors "
                             f"metadata nor in a sidecar JSON); set the architecture input to a timm model name")
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:12]}*")[:5]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise GFCGInputError(f"architecture: {arch!r} is not a timm architecture{hint}")

    probe = timm.create_model(arch, pretrained=False, num_classes=1)
    k = _meta_value(meta, sidecar, "num_classes") or _head_classes(probe, sd)
    if not k:
        raise GFCGInputError(f"classifier {base!r}: cannot tell its class count (no 'num_classes' and no "
                             f"classifier head in the weights)")
    net = timm.create_model(arch, pretrained=False, num_classes=int(k))
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[:3]
        raise GFCGInputError(f"classifier {base!r} does not match architecture {arch!r}: {' '.join(first)[:400]}") from None

    cfg = dict(timm.data.resolve_model_data_config(net))
    override = _meta_value(meta, sidecar, "data_config") or {}
    cfg.update(override)
    names = _meta_value(meta, sidecar, "class_names")
    if names is None:
        names = imagenet_class_names() if int(k) == 1000 else [f"class_{i}" for i in range(int(k))]
    if len(names) != int(k):
        raise GFCGInputError(f"classifier {base!r} has {k} outputs but its class_names list has {len(names)} entries")
    return ImageClassifier(net.to(dtype), DataConfig.from_timm(cfg), names, name=name or base)


def save_timm_classifier(path: str, net: torch.nn.Module, architecture: str,
                         class_names: Optional[List[str]] = None, data_config: Optional[Dict] = None) -> None:
    """Write a timm net as safetensors with the metadata ``load_timm_classifier`` reads."""
    from safetensors.torch import save_file

    meta = {"architecture": architecture}
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
    if data_config is not None:
        meta["data_config"] = json.dumps(data_config)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path, metadata=meta)
