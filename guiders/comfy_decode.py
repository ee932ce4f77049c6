"""Decoding x0 for the classifier during sampling (imports ComfyUI): the VAE's own decoder, ComfyUI's
TAESD, or the latent format's latent-to-RGB factors, and which patchers load with the model."""
from __future__ import annotations

import logging

import torch

from ..classifiers.timm_classifier import straight_through_clamp
from ..common.errors import GFCGInputError
from ..common.grad_copy import copy_bytes, plain_resident_copy
from .pixels import auto_latent_size, is_pixel_vae, latent_rgb

log = logging.getLogger("comfyui_gfcg")


DECODE_METHODS = ("auto", "vae", "taesd", "latent_rgb")
AUTO_RESOLUTION = 0.0     # decode_resolution = 0: the size the classifier consumes (auto_latent_size)
_told = set()             # fallbacks already logged (once per format and choice)


def _decoder_parts(vae):
    fsm = vae.first_stage_model
    enc = getattr(fsm, "encoder", None)
    return fsm, getattr(vae, "vae_dtype", None), [enc] if isinstance(enc, torch.nn.Module) else []


def _decoder_only_copy(vae) -> torch.nn.Module:
    """A copy of a VAE's first-stage model without its encoder, whose weights autograd may use, on
    the VAE's device: an ordinary resident module whatever way ComfyUI loaded the VAE (under
    inference mode, in lowvram, or dynamically), see ``grad_copy``. Used only for gradients."""
    fsm, dtype, skip = _decoder_parts(vae)
    return plain_resident_copy(fsm, vae.device, dtype, skip=skip)


def decoder_copy_bytes(vae) -> int:
    """Bytes of :func:`_decoder_only_copy`'s copy."""
    fsm, dtype, skip = _decoder_parts(vae)
    return copy_bytes(fsm, dtype, skip)


def vae_free_memory(vae) -> int:
    """Free memory on the VAE's device as ComfyUI's own decode sees it: the patcher's view where it
    has one (0.33+, which counts dynamically loaded weights), else model management's."""
    import comfy.model_management as mm

    patcher = getattr(vae, "patcher", None)
    if patcher is not None and hasattr(patcher, "get_free_memory"):
        return patcher.get_free_memory(vae.device)
    return mm.get_free_memory(vae.device)


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's out-of-memory error, or another backend's 'out of memory' RuntimeError."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def decode_batches(vae, z: torch.Tensor, decode) -> torch.Tensor:
    """``decode(z)`` for the VAE's latent ``z`` the way ``VAE.decode`` batches it: as many images per
    call as ComfyUI's own estimate (``vae.memory_used_decode``, per image at this size) says fit in
    the free memory (:func:`vae_free_memory`), at least one; on running out of memory anyway, a
    tiled decode (``comfy.utils.tiled_scale``, 64-latent-pixel tiles, overlap 16, as ComfyUI's
    fallback tiles), logged once. Nothing is loaded or freed here: the VAE was loaded with the
    sampled model, and a load inside the loop could push the sampled model out."""
    import comfy.model_management as mm
    import comfy.utils

    n = int(z.shape[0])
    try:
        per_image = float(vae.memory_used_decode(z.shape, vae.vae_dtype))
        step = max(1, int(vae_free_memory(vae) // max(per_image, 1.0)))
    except Exception:   # noqa: BLE001 -- a VAE without ComfyUI's estimate: one call, as before
        step = n
    try:
        if step >= n:
            return decode(z)
        return torch.cat([decode(z[i:i + step]) for i in range(0, n, step)])
    except Exception as e:   # noqa: BLE001 -- only out-of-memory falls back (mm.OOM_EXCEPTION is Exception on a CPU)
        ratio = spatial_ratio(getattr(vae, "upscale_ratio", None))
        frame = z.ndim == 5 and z.shape[2] == 1       # one frame of a video-shaped latent: tile the frame
        if not is_out_of_memory(e) or ratio is None or not (z.ndim == 4 or frame):
            raise
        if "tiled" not in _told:
            _told.add("tiled")
            log.warning("GFCG decode: the VAE decode for the classifier ran out of memory; decoding it in tiles "
                        "(slower; decode = taesd or a smaller decode_resolution avoids it)")
        mm.soft_empty_cache()
        if frame:
            out = comfy.utils.tiled_scale(z[:, :, 0], lambda a: decode(a.unsqueeze(2))[:, :, 0], tile_x=64, tile_y=64,
                                          overlap=16, upscale_amount=ratio,
                                          out_channels=getattr(vae, "output_channels", 3), output_device=z.device)
            return out.unsqueeze(2)
        return comfy.utils.tiled_scale(z, decode, tile_x=64, tile_y=64, overlap=16, upscale_amount=ratio,
                                       out_channels=getattr(vae, "output_channels", 3), output_device=z.device)


def spatial_ratio(ratio):
    """Pixels per latent pixel in height and width from a VAE's ``upscale_ratio``: an int, or ComfyUI's
    (time rule, height, width) tuple of video VAEs when height and width agree; else None."""
    if isinstance(ratio, int):
        return ratio
    if isinstance(ratio, tuple) and len(ratio) == 3 and isinstance(ratio[1], int) and ratio[1] == ratio[2]:
        return ratio[1]
    return None


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


def taesd_files(name: str) -> list:
    import folder_paths

    return [f for f in folder_paths.get_filename_list("vae_approx") if f.startswith(name)]


def is_video_format(fmt) -> bool:
    """A latent format of ComfyUI's video-shaped families ([B, C, T, H, W]: Wan21 for Qwen-Image, Wan,
    Cosmos-Predict2, Anima; HunyuanVideo, ...), whose preview decoder is a video TAE (e.g.
    lighttaew2_1, a TAEHV) that ComfyUI's TAESD class cannot load."""
    return int(getattr(fmt, "latent_dimensions", 2)) == 3


def resolve_decode(model, vae, method: str) -> str:
    """decode = auto: ComfyUI's TAESD where models/vae_approx holds the one for the model's latent
    format, the full VAE otherwise (logged once per format) and for video-shaped formats (their
    preview file is a video TAE); other methods as they are, taesd refused on video-shaped formats."""
    fmt = getattr(model, "latent_format", None)
    if method == "taesd" and is_video_format(fmt):
        raise GFCGInputError(f"decode: taesd cannot decode {type(fmt).__name__} latents (ComfyUI previews them with "
                             f"a video TAE{', ' + fmt.taesd_decoder_name if getattr(fmt, 'taesd_decoder_name', None) else ''}"
                             "); use decode = vae (or auto, which picks it) or latent_rgb")
    if method != "auto":
        return method
    if vae is None or is_pixel_vae(vae):
        return "vae"     # pixel space: nothing is decoded
    fmt = getattr(model, "latent_format", None)
    name = getattr(fmt, "taesd_decoder_name", None) or (getattr(fmt, "gfcg_taesd", None) or (None,))[0]
    choice = "taesd" if name and taesd_files(name) and not is_video_format(fmt) else "vae"
    key = (type(fmt).__name__, choice)
    if key not in _told:
        _told.add(key)
        if choice == "taesd":
            log.info("GFCG decode = auto: TAESD (%s) from models/vae_approx for the classifier's view of %s latents",
                     name, type(fmt).__name__)
        else:
            log.info("GFCG decode = auto: no TAESD %sin models/vae_approx, so the classifier's view of %s latents is "
                     "decoded with the full VAE (slower; put %s.safetensors there for the fast path)",
                     f"({name}) " if name else "for them ", type(fmt).__name__, name or "a TAESD decoder")
    return choice


def load_taesd(name: str, latent_channels: int):
    """ComfyUI's TAESD decoder ``name`` from models/vae_approx (file name starting with ``name``,
    as ComfyUI's previewer finds it), built with inference mode off (usable by autograd)."""
    import folder_paths
    from comfy.taesd.taesd import TAESD

    files = taesd_files(name)
    if not files:
        roots = ", ".join(folder_paths.get_folder_paths("vae_approx"))
        raise GFCGInputError(f"decode: taesd needs {name}.safetensors (or .pth) in models/vae_approx ({roots}); "
                             f"get it from github.com/madebyollin/taesd, or use decode = vae or latent_rgb")
    with torch.inference_mode(False):
        return TAESD(None, folder_paths.get_full_path_or_raise("vae_approx", files[0]), latent_channels=latent_channels)


class PixelDecoder:
    """x0 (model space) -> RGB in [0, 1], [B, 3, H, W], on the device it is computed on.

    ``method``: ``vae`` decodes with the VAE's own decoder module (already loaded with the main
    model), batched by ComfyUI's memory estimate with its tiled fallback (:func:`decode_batches`),
    skipping ``VAE.decode``'s round trip to the intermediate device; ``taesd`` with
    ComfyUI's tiny TAESD decoder from models/vae_approx; ``latent_rgb`` with the latent format's
    linear latent-to-RGB preview factors (no network); ``auto`` must be resolved first
    (``resolve_decode``). ``resolution`` < 1 first shrinks x0 (antialiased bilinear), so the
    decoder and the classifier's resize work on fewer pixels; 0 (auto) shrinks it to what the
    classifier consumes (``auto_latent_size`` with ``resize_size``, the classifier's own resize
    rule; not for latent_rgb, whose pixels are the latent's). Pixel-space models only map
    [-1, 1] -> [0, 1].

    Values are clamped to [0, 1] with a straight-through gradient. ``prepare_gradients`` makes
    the decoders differentiable (copies whose weights autograd may use); ``release`` drops them.
    """

    def __init__(self, vae=None, method: str = "vae", resolution: float = 1.0, resize_size=None):
        if method not in DECODE_METHODS or method == "auto":
            raise GFCGInputError(f"decode: {method!r} is not one of {', '.join(DECODE_METHODS[1:])} (resolve auto "
                                 "with resolve_decode first)")
        if not 0.0 <= float(resolution) <= 1.0:
            raise GFCGInputError(f"decode_resolution: {resolution!r} must be in [0, 1] (0 = auto)")
        if float(resolution) == AUTO_RESOLUTION and resize_size is None:
            raise GFCGInputError("decode_resolution: 0 (auto) needs the classifier's resize rule")
        self.vae, self.method, self.resolution = vae, method, float(resolution)
        self.resize_size = resize_size
        self._taesd = None
        self._grad_vae = None
        self._rgb = None

    def is_pixel_space(self, z: torch.Tensor) -> bool:
        vae = self.vae
        return vae is None or is_pixel_vae(vae)

    def gradient_bytes(self) -> int:
        """Device memory :meth:`prepare_gradients` will take (the VAE decoder's copy; 0 otherwise)."""
        if self.method == "vae" and self.vae is not None and self._grad_vae is None:
            return decoder_copy_bytes(self.vae)
        return 0

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

    def _ratio(self) -> int:
        """Pixels per latent pixel of the decoder (the VAE's downscale ratio; 8 where it has none)."""
        if self.method == "latent_rgb":
            return 1
        r = getattr(self.vae, "downscale_ratio", 8)
        return r if isinstance(r, int) and r > 0 else 8

    def target_size(self, h: int, w: int):
        """The latent size x0 is decoded at."""
        if self.resolution == AUTO_RESOLUTION:
            if self.method == "latent_rgb" or self.vae is None or is_pixel_vae(self.vae):
                return h, w   # the latent's own pixels / pixel space: shrinking only loses detail
            return auto_latent_size(h, w, self._ratio(), self.resize_size)
        if self.resolution >= 1.0:
            return h, w
        return max(1, round(h * self.resolution)), max(1, round(w * self.resolution))

    def _shrink(self, x0: torch.Tensor) -> torch.Tensor:
        h, w = x0.shape[-2:]
        size = self.target_size(h, w)
        if size == (h, w):
            return x0
        if x0.ndim == 5:      # one frame of a video-shaped latent [B, C, 1, H, W]
            return self._shrink(x0[:, :, 0]).unsqueeze(2)
        return torch.nn.functional.interpolate(x0, size=size, mode="bilinear", antialias=True, align_corners=False)

    def __call__(self, model, x0: torch.Tensor) -> torch.Tensor:
        """RGB [B, 3, H, W] in [0, 1] of model-space ``x0``: an image latent [B, C, h, w], or one frame
        [B, C, 1, h, w] of a video-shaped family (decoded as such, its one frame kept)."""
        if x0.ndim == 5 and x0.shape[2] != 1:
            raise GFCGInputError(f"latent: {int(x0.shape[2])} frames; the classifier judges single images")
        img = self._decode(model, self._shrink(x0))
        return img[:, :, 0] if img.ndim == 5 else img

    def _decode(self, model, x0: torch.Tensor) -> torch.Tensor:
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
            flat = x0[:, :, 0] if x0.ndim == 5 else x0
            return straight_through_clamp((latent_rgb(model.latent_format, flat.float(), *self._rgb_factors(
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
            z = z.to(device=vae.device, dtype=vae.vae_dtype)
            if self._grad_vae is not None:    # gradients: one call through the grad-capable copy
                img = self._grad_vae.decode(z).float()
            else:
                img = decode_batches(vae, z, lambda a: vae.first_stage_model.decode(a).float())
        return straight_through_clamp(img if zero_one else (img + 1.0) / 2.0)   # EDM2 reads it as [0, 1]


def additional_models(classifier, vae, decode: str) -> list:
    """The patchers ComfyUI should load with the main model: the classifier, and the VAE where its
    decoder runs during sampling (not for decode = taesd / latent_rgb, nor the pixel_space VAE,
    which decodes nothing: pixel-space x0 is mapped as it is)."""
    extra = [classifier.patcher]
    if vae is not None and getattr(vae, "patcher", None) is not None and decode in ("vae", "auto") \
            and not is_pixel_vae(vae):
        extra.append(vae.patcher)
    return extra
