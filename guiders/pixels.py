"""Pixels from model-space x0 without a decoder network (framework-free, duck-typed on ComfyUI's
latent formats and VAEs): the latent-to-RGB preview map and the pixel_space-VAE predicate."""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch

from ..common.errors import GFCGInputError


def is_pixel_vae(vae) -> bool:
    """ComfyUI's pixel_space VAE (3 channels, no downscale): it decodes nothing."""
    return vae is not None and getattr(vae, "latent_channels", None) == 3 and getattr(vae, "downscale_ratio", 8) == 1


def latent_rgb(fmt, x0: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ComfyUI's latent-to-RGB preview of model-space ``x0`` [B, C, H, W], for the whole batch:
    v = W^T r(x0) + b per pixel, with ``r`` the format's ``latent_rgb_factors_reshape`` where it has
    one (e.g. Flux2's 2x2 un-patchify, 128 -> 32 channels at twice the side), ``W`` [C', 3] its
    ``latent_rgb_factors`` and ``b`` their bias; v in [-1, 1]."""
    reshape = getattr(fmt, "latent_rgb_factors_reshape", None)
    if reshape is not None:
        x0 = reshape(x0)
    if x0.ndim != 4:
        raise GFCGInputError(f"decode: latent_rgb shows image latents [B, C, H, W]; these are {x0.ndim}-D "
                             f"({type(fmt).__name__}, e.g. video); use decode = vae")
    if x0.shape[1] != factors.shape[0]:
        raise GFCGInputError(f"decode: {type(fmt).__name__}'s latent_rgb factors map {factors.shape[0]} channels, "
                             f"the latents have {x0.shape[1]}; use decode = vae")
    return torch.einsum("bchw,cr->brhw", x0, factors) + bias


def auto_latent_size(h: int, w: int, ratio: int, resize_size: Callable[[int, int], Tuple[int, int]]) -> Tuple[int, int]:
    """decode_resolution = auto: the smallest latent size whose decode still covers what the
    classifier's own preprocessing keeps. With the full decode H = ratio h, W = ratio w and
    (sh, sw) = resize_size(H, W) (the size the classifier resizes it to before its crop),
    f = min(1, max(sh / H, sw / W)) and the latent is shrunk to (ceil(f h), ceil(f w)): its decode
    is never smaller than (sh, sw), so the classifier only ever shrinks (e.g. a 64x64 SD latent,
    512 px, for ResNet-50 at 224 / crop 0.95: 235 px -> a 30x30 latent, decoded at 240 px)."""
    big_h, big_w = ratio * h, ratio * w
    sh, sw = resize_size(big_h, big_w)
    f = min(1.0, max(sh / big_h, sw / big_w))
    return min(h, math.ceil(f * h)), min(w, math.ceil(f * w))
