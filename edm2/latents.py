"""EDM2 latent conventions (img512) and their relation to ComfyUI's SD1.5 VAE world.

EDM2 encodes pixels p in [0, 1] (not [-1, 1]) with the SD ft-MSE VAE, then normalises the raw
latent z per channel: x = scale * z + bias, scale = 0.5 / raw_std, bias = -raw_mean * scale, with
raw_mean = (5.81, 3.25, 0.12, -2.15) and raw_std = (4.17, 4.62, 3.71, 3.28). Decoding reads the
VAE output y directly as the [0, 1] image: p = clamp(y, 0, 1).

ComfyUI's VAE nodes instead feed 2p - 1 to the encoder and return clamp((y + 1) / 2, 0, 1). So:
- decode:  p = clamp(2 o - 1, 0, 1) where o is ComfyUI's decoded image (exactly clamp(y, 0, 1));
- encode:  give ComfyUI's encoder (p + 1) / 2 so that the VAE sees p.
"""
from __future__ import annotations

import torch

RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
FINAL_STD = 0.5
SD15_SCALE = 0.18215

# SD1.5 latent -> RGB factors of ComfyUI's previewer, for model-space x_sd = 0.18215 z (values
# give the [-1, 1] image); used to derive the EDM2 preview factors below.
SD15_RGB = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
            (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))


def default_scale_bias():
    """(scale, bias) of EDM2's StabilityVAEEncoder defaults, computed in float32 as NVlabs does."""
    std = torch.tensor(RAW_STD, dtype=torch.float32)
    scale = torch.tensor(FINAL_STD, dtype=torch.float32) / std
    bias = -torch.tensor(RAW_MEAN, dtype=torch.float32) * scale
    return scale.tolist(), bias.tolist()


_s, _b = default_scale_bias()
EDM2_DEFAULT_ENCODER = {"kind": "stability_vae", "vae_name": "stabilityai/sd-vae-ft-mse", "scale": _s, "bias": _b}


_CONSTANTS: dict = {}


def _v(vals, like):
    """The per-channel constants ``vals`` as [1, C, 1, 1] on ``like``'s device and dtype, made once
    per (values, device, dtype): no host-to-device copy each time a latent is converted."""
    key = (tuple(float(v) for v in vals), like.device, like.dtype)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 64:
            _CONSTANTS.clear()
        with torch.inference_mode(False):   # an ordinary tensor: usable by autograd (gradient guidance) too
            t = _CONSTANTS[key] = torch.as_tensor(key[0], dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return t


def raw_to_edm2(z: torch.Tensor, scale, bias) -> torch.Tensor:
    """x = scale * z + bias (per channel): raw VAE latent -> EDM2 model-space latent."""
    return z * _v(scale, z) + _v(bias, z)


def edm2_to_raw(x: torch.Tensor, scale, bias) -> torch.Tensor:
    """z = (x - bias) / scale (per channel): EDM2 latent -> raw VAE latent."""
    return (x - _v(bias, x)) / _v(scale, x)


def comfy_image_to_edm2_pixels(o: torch.Tensor) -> torch.Tensor:
    """p = clamp(2 o - 1, 0, 1): ComfyUI's VAE-decoded image of an EDM2 latent -> EDM2's image."""
    return (2 * o - 1).clamp(0, 1)


def edm2_pixels_to_comfy_encoder_input(p: torch.Tensor) -> torch.Tensor:
    """(p + 1) / 2: what ComfyUI's VAE encode must receive so that the VAE sees p, as in EDM2."""
    return (p + 1) / 2


def preview_factors(scale, bias):
    """Latent->RGB preview factors for EDM2 model-space latents (an approximation).

    With x_sd = 0.18215 (x - bias) / scale = a x + d, and EDM2 reading the VAE output as the [0, 1]
    image while ComfyUI's previewer shows (v + 1) / 2, v = 2 RGB(x_sd) - 1: factors 2 a_c F_c and
    bias 2 sum_c F_c d_c - 1.
    """
    a = [SD15_SCALE / s for s in scale]
    d = [-SD15_SCALE * b / s for s, b in zip(scale, bias)]
    factors = [[2 * a[c] * f for f in SD15_RGB[c]] for c in range(4)]
    rgb_bias = [2 * sum(SD15_RGB[c][j] * d[c] for c in range(4)) - 1 for j in range(3)]
    return factors, rgb_bias
