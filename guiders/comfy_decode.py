"""Decoding x0 for the classifier during sampling (imports ComfyUI): the VAE's own decoder, ComfyUI's
TAESD, or the latent format's latent-to-RGB factors, and which patchers load with the model."""
from __future__ import annotations

import torch

from ..classifiers.timm_classifier import straight_through_clamp
from ..common.errors import GFCGInputError
from .grad_copy import plain_resident_copy
from .pixels import is_pixel_vae, latent_rgb


DECODE_METHODS = ("vae", "taesd", "latent_rgb")


def _decoder_only_copy(vae) -> torch.nn.Module:
    """A copy of a VAE's first-stage model without its encoder, whose weights autograd may use, on
    the VAE's device: an ordinary resident module whatever way ComfyUI loaded the VAE (under
    inference mode, in lowvram, or dynamically), see ``grad_copy``. Used only for gradients."""
    fsm = vae.first_stage_model
    enc = getattr(fsm, "encoder", None)
    return plain_resident_copy(fsm, vae.device, getattr(vae, "vae_dtype", None),
                               skip=[enc] if isinstance(enc, torch.nn.Module) else [])


def taesd_input(model, x0: torch.Tensor):
    """(TAESD decoder name, its input) for a model-space x0. TAESD works in the SD-scaled latent
    space that ComfyUI's standard latent formats use as model space (so x0 as is); formats with
    their own model space (EDM2) name the standard format to convert through (``gfcg_taesd``)."""
    fmt = model.latent_format
    name = getattr(fmt, "taesd_decoder_name", None)
    if name:
        return name, x0
    alt = getattr(fmt, "gfcg_taesd", None)
    if alt is not None:
        return alt[0], alt[1].process_in(model.process_latent_out(x0))
    raise GFCGInputError(f"decode: ComfyUI knows no TAESD decoder for {type(fmt).__name__} latents; "
                         f"use decode = vae or latent_rgb")


def load_taesd(name: str, latent_channels: int):
    """ComfyUI's TAESD decoder ``name`` from models/vae_approx (file name starting with ``name``,
    as ComfyUI's previewer finds it), built with inference mode off (usable by autograd)."""
    import folder_paths
    from comfy.taesd.taesd import TAESD

    files = [f for f in folder_paths.get_filename_list("vae_approx") if f.startswith(name)]
    if not files:
        roots = ", ".join(folder_paths.get_folder_paths("vae_approx"))
        raise GFCGInputError(f"decode: taesd needs {name}.safetensors (or .pth) in models/vae_approx ({roots}); "
                             f"get it from github.com/madebyollin/taesd, or use decode = vae or latent_rgb")
    with torch.inference_mode(False):
        return TAESD(None, folder_paths.get_full_path_or_raise("vae_approx", files[0]), latent_channels=latent_channels)


class PixelDecoder:
    """x0 (model space) -> RGB in [0, 1], [B, 3, H, W], on the device it is computed on.

    ``method``: ``vae`` decodes with the VAE's own decoder module (already loaded with the main
    model), skipping ``VAE.decode``'s round trip to the intermediate device; ``taesd`` with
    ComfyUI's tiny TAESD decoder from models/vae_approx; ``latent_rgb`` with the latent format's
    linear latent-to-RGB preview factors (no network). ``resolution`` < 1 first shrinks x0
    (antialiased bilinear), so the decoder and the classifier's resize work on fewer pixels.
    Pixel-space models only map [-1, 1] -> [0, 1].

    Values are clamped to [0, 1] with a straight-through gradient. ``prepare_gradients`` makes
    the decoders differentiable (copies whose weights autograd may use); ``release`` drops them.
    """

    def __init__(self, vae=None, method: str = "vae", resolution: float = 1.0):
        if method not in DECODE_METHODS:
            raise GFCGInputError(f"decode: {method!r} is not one of {', '.join(DECODE_METHODS)}")
        if not 0.0 < float(resolution) <= 1.0:
            raise GFCGInputError(f"decode_resolution: {resolution!r} must be in (0, 1]")
        self.vae, self.method, self.resolution = vae, method, float(resolution)
        self._taesd = None
        self._grad_vae = None
        self._rgb = None

    def is_pixel_space(self, z: torch.Tensor) -> bool:
        vae = self.vae
        return vae is None or is_pixel_vae(vae)

    def prepare_gradients(self) -> None:
        """Make the VAE decoder differentiable: a copy on the device ComfyUI loaded the VAE to."""
        if self.method == "vae" and self.vae is not None and self._grad_vae is None:
            self._grad_vae = _decoder_only_copy(self.vae)

    def release(self) -> None:
        self._grad_vae = None
        self._taesd = None

    def _rgb_factors(self, fmt, device):
        """The format's latent-to-RGB factors [C, 3] and bias [1, 3, 1, 1] on ``device`` (made once)."""
        if self._rgb is None or self._rgb[0].device != torch.device(device):
            if getattr(fmt, "latent_rgb_factors", None) is None:
                raise GFCGInputError(f"decode: ComfyUI has no latent_rgb preview colours for {type(fmt).__name__} "
                                     "latents; use decode = vae (or taesd where ComfyUI has a TAESD for them)")
            factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)
            bias = getattr(fmt, "latent_rgb_factors_bias", None)
            bias = torch.zeros(3) if bias is None else torch.tensor(bias, dtype=torch.float32)
            self._rgb = (factors.to(device), bias.view(1, 3, 1, 1).to(device))
        return self._rgb

    def _shrink(self, x0: torch.Tensor) -> torch.Tensor:
        if self.resolution >= 1.0:
            return x0
        h, w = x0.shape[-2:]
        size = (max(1, round(h * self.resolution)), max(1, round(w * self.resolution)))
        return torch.nn.functional.interpolate(x0, size=size, mode="bilinear", antialias=True, align_corners=False)

    def __call__(self, model, x0: torch.Tensor) -> torch.Tensor:
        x0 = self._shrink(x0)
        z = model.process_latent_out(x0)
        if self.is_pixel_space(z):
            if z.shape[1] != 3:
                raise ValueError(f"vae: the model makes {z.shape[1]}-channel latents, so a VAE is needed to show "
                                 "them to the classifier; connect the model's VAE")
            return straight_through_clamp((z.float() + 1.0) / 2.0)
        vae = self.vae
        if vae.latent_channels != z.shape[1]:
            raise ValueError(f"vae: this VAE decodes {vae.latent_channels}-channel latents but the model makes "
                             f"{z.shape[1]}-channel ones; connect the VAE that belongs to the model")
        zero_one = getattr(getattr(model, "latent_format", None), "vae_output_range", "-1..1") == "0..1"
        if self.method == "latent_rgb":
            return straight_through_clamp((latent_rgb(model.latent_format, x0.float(), *self._rgb_factors(
                model.latent_format, x0.device)) + 1.0) / 2.0)   # the previewer's [-1, 1] -> [0, 1]
        if self.method == "taesd":
            name, t_in = taesd_input(model, x0)
            if self._taesd is None:
                self._taesd = load_taesd(name, z.shape[1])
            if next(self._taesd.parameters()).device != x0.device:
                with torch.inference_mode(False):
                    self._taesd.to(x0.device)
            img = self._taesd.decode(t_in.float()).float()   # the SD VAE decoder's output range
        else:
            fsm = self._grad_vae if self._grad_vae is not None else vae.first_stage_model
            img = fsm.decode(z.to(device=vae.device, dtype=vae.vae_dtype)).float()
        return straight_through_clamp(img if zero_one else (img + 1.0) / 2.0)   # EDM2 reads it as [0, 1]


def additional_models(classifier, vae, decode: str) -> list:
    """The patchers ComfyUI should load with the main model: the classifier, and the VAE where its
    decoder runs during sampling (not for decode = taesd / latent_rgb, nor the pixel_space VAE,
    which decodes nothing: pixel-space x0 is mapped as it is)."""
    extra = [classifier.patcher]
    if vae is not None and getattr(vae, "patcher", None) is not None and decode == "vae" and not is_pixel_vae(vae):
        extra.append(vae.patcher)
    return extra
