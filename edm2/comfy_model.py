"""EDM2 inside ComfyUI: latent formats, the model wrapper, loading, class-label conditioning.

ComfyUI's ``ModelType.EDM`` already computes the preconditioning (c_in x, c_noise = ln(sigma)/4,
c_skip x + c_out F), so the diffusion model handed to ComfyUI is the raw network F.
"""
from __future__ import annotations

import os

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.supported_models_base
import folder_paths

from ..common.comfy_folders import ensure_folder
from ..common.comfy_patcher import patcher_class
from ..common.folders import bundled_folders
from .checkpoint import CheckpointError, EDM2Checkpoint, build_network, read_checkpoint
from .network import MPConv, mp_apply
from .latents import EDM2_DEFAULT_ENCODER, RAW_MEAN, edm2_to_raw, preview_factors, raw_to_edm2

FOLDER_KEY = "edm2"
EXTENSIONS = {".pkl", ".safetensors", ".sft"}
SAMPLING = {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register_folder() -> None:
    """``models/edm2`` and the pack's testbed models under the pack's key ``edm2`` (.pkl / .safetensors / .sft)."""
    ensure_folder(FOLDER_KEY, [os.path.join(folder_paths.models_dir, FOLDER_KEY), *bundled_folders(FOLDER_KEY)], EXTENSIONS)


def list_checkpoints():
    """Files in models/edm2, plus files in diffusion_models whose name contains 'edm2'."""
    register_folder()
    own = folder_paths.get_filename_list(FOLDER_KEY)
    extra = [n for n in folder_paths.get_filename_list("diffusion_models")
             if "edm2" in n.lower() and os.path.splitext(n)[1].lower() in EXTENSIONS and n not in own]
    return sorted(own) + sorted(extra)


def checkpoint_path(name: str):
    """Full path of a listed checkpoint name, or None."""
    register_folder()
    return folder_paths.get_full_path(FOLDER_KEY, name) or folder_paths.get_full_path("diffusion_models", name)


# ----------------------------------------------------------------------------------------------
# Latent formats


class EDM2LatentFormat(comfy.latent_formats.LatentFormat):
    """img512: ComfyUI's LATENT holds raw SD-VAE latents z; the model works on x = scale z + bias.

    process_in(z) = scale z + bias, process_out(x) = (x - bias) / scale (per channel), with the
    checkpoint's encoder constants (defaults: scale = 0.5 / raw_std, bias = -raw_mean scale).
    """

    latent_channels = 4
    latent_dimensions = 2
    spacial_downscale_ratio = 8   # the SD VAE's (ComfyUI's empty-latent resizing reads it, v0.33+)
    vae_output_range = "0..1"  # EDM2 reads the VAE decoder's output as the [0, 1] image

    def __init__(self, scale=None, bias=None):
        self.scale = list(scale or EDM2_DEFAULT_ENCODER["scale"])
        self.bias = list(bias or EDM2_DEFAULT_ENCODER["bias"])
        self.latent_rgb_factors, self.latent_rgb_factors_bias = preview_factors(self.scale, self.bias)
        self.taesd_decoder_name = None  # SD1.5 TAESD expects SD-scaled latents, not EDM2's (no previews)
        # ... so the pack's decoder converts: TAESD(SD15.process_in(process_out(x))), see comfy_guider
        self.gfcg_taesd = ("taesd_decoder", comfy.latent_formats.SD15())

    def process_in(self, latent):
        return raw_to_edm2(latent, self.scale, self.bias)

    def process_out(self, latent):
        return edm2_to_raw(latent, self.scale, self.bias)


class EDM2PixelFormat(comfy.latent_formats.LatentFormat):
    """img64: the model works on pixels in [-1, 1], as ComfyUI's pixel-space VAE produces them."""

    latent_channels = 3
    latent_dimensions = 2
    spacial_downscale_ratio = 1   # pixels: one latent pixel per image pixel (ComfyUI's resizing reads it)

    def __init__(self):
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        self.latent_rgb_factors_bias = None
        self.taesd_decoder_name = None

    def process_in(self, latent):
        return latent

    def process_out(self, latent):
        return latent


def latent_format_for(ckpt: EDM2Checkpoint):
    if ckpt.config.img_channels == 3:
        return EDM2PixelFormat()
    if ckpt.config.img_channels == 4:
        enc = ckpt.encoder or {}
        return EDM2LatentFormat(enc.get("scale"), enc.get("bias"))
    raise CheckpointError(f"EDM2 checkpoint '{ckpt.source}' has {ckpt.config.img_channels} image channels; "
                          "only 4 (img512 latents) and 3 (img64 pixels) are supported")


def empty_latent(family: str, batch_size: int, resolution: int = 64) -> torch.Tensor:
    """A LATENT whose model-space value is exactly 0: raw_mean per channel (img512), zeros (img64)."""
    if family == "img512":
        z = torch.tensor(RAW_MEAN, dtype=torch.float32).view(1, 4, 1, 1)
        return z.expand(batch_size, 4, resolution, resolution).contiguous()
    if family == "img64":
        return torch.zeros(batch_size, 3, resolution, resolution)
    raise ValueError(f"family must be 'img512' or 'img64', got {family!r}")


# ----------------------------------------------------------------------------------------------
# Model


class EDM2ModelConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}
    sampling_settings = dict(SAMPLING)
    memory_usage_factor = 2.0
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    def __init__(self, latent_format):
        super().__init__({"disable_unet_model_creation": True})
        self.latent_format = latent_format


class EDM2DiffusionModel(torch.nn.Module):
    """ComfyUI's ``diffusion_model``: F(x_in, c_noise, y); ComfyUI applies the EDM preconditioning."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    @property
    def dtype(self):
        return self.net.dtype

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return self.net.raw(x, timesteps, y)


def edm_noise_scaling(sigma, noise, latent_image, max_denoise=False):
    """EDM's starting point x = latent + sigma * noise, at sigma_max too (EDM2 draws x_0 = sigma_max n).

    ComfyUI's EPS family scales the noise by sqrt(1 + sigma^2) when it starts from sigma_max (it
    assumes unit-variance data); for EDM2 that is 80.006 instead of 80, and it would keep ComfyUI
    from reproducing the EDM sampler (and the pack's headless sampler) for the same seed."""
    sigma = torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device).reshape(-1, *([1] * (noise.ndim - 1)))
    return noise * sigma + latent_image


class EDM2Model(comfy.model_base.BaseModel):
    """An EDM2 network as a ComfyUI model (EDM prediction, sigma_data 0.5, sigmas 0.002..80)."""

    def __init__(self, net, ckpt: EDM2Checkpoint, device=None):
        super().__init__(EDM2ModelConfig(latent_format_for(ckpt)), comfy.model_base.ModelType.EDM, device=device)
        self.diffusion_model = EDM2DiffusionModel(net)
        self.model_sampling.noise_scaling = edm_noise_scaling
        self.label_dim = ckpt.config.label_dim
        self.edm2_source = ckpt.source
        self.edm2_family = ckpt.family

    def extra_conds(self, **kwargs):
        """``class_labels`` [k, L] (one-hot rows) -> y; a conditional net without labels gets zeros
        (NVlabs' label-less mode, which was not trained); an unconditional net takes none."""
        if not self.label_dim:
            return {}
        labels = kwargs.get("class_labels")
        if labels is None:
            labels = torch.zeros(1, self.label_dim)
        elif labels.ndim != 2 or labels.shape[1] != self.label_dim:
            raise ValueError(f"class_labels: the conditioning's class label has {labels.shape[-1]} entries but EDM2 "
                             f"model '{os.path.basename(str(self.edm2_source))}' takes {self.label_dim} classes; set "
                             f"num_classes = {self.label_dim} on EDM2 Class Label")
        return {"y": comfy.conds.CONDRegular(labels.float())}


def resolve_dtype(weight_dtype: str, ckpt: EDM2Checkpoint):
    if weight_dtype == "default":
        n = sum(v.numel() for v in ckpt.state_dict.values())
        return mm.unet_dtype(model_params=n, supported_dtypes=EDM2ModelConfig.supported_inference_dtypes)
    if weight_dtype not in DTYPES:
        raise ValueError(f"weight_dtype must be one of default, {', '.join(DTYPES)}; got {weight_dtype!r}")
    return DTYPES[weight_dtype]


class CastMPConv(MPConv, comfy.ops.CastWeightBiasOp):
    """A folded MPConv with ComfyUI's weight-cast hooks: when a partial (lowvram) load leaves it on
    the offload device, ComfyUI turns ``comfy_cast_weights`` on and its weight is cast to the
    input's device and dtype at each forward (``comfy.ops.cast_bias_weight``), as ComfyUI's own
    layers do; otherwise it is the plain MPConv. A DynamicVRAM load (0.33+) turns the casts on for
    every layer and streams its weight through a VRAM slice that ``uncast_bias_weight`` releases
    after the forward, as ComfyUI's own layers call it; ComfyUI without it (0.3.64) gets the
    two-value form."""

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        if self.folded and (self.comfy_cast_weights or len(self.weight_function) > 0):
            uncast = getattr(comfy.ops, "uncast_bias_weight", None)   # 0.33+
            if uncast is None:
                weight, _ = comfy.ops.cast_bias_weight(self, x)
                return mp_apply(x, weight)
            weight, _, stream = comfy.ops.cast_bias_weight(self, x, offloadable=True)
            try:
                return mp_apply(x, weight)
            finally:
                uncast(self, weight, None, stream)
        return super().forward(x, gain)


def with_cast_hooks(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with every MPConv made a :class:`CastMPConv` in place (same weights, no bias)."""
    for m in net.modules():
        if type(m) is MPConv:
            m.__class__ = CastMPConv
            m.bias = None
    return net


def model_from_checkpoint(ckpt: EDM2Checkpoint, weight_dtype: str = "default", disable_dynamic: bool = False):
    """A ModelPatcher for a read checkpoint (weights folded and cast on the offload device; layers
    that ComfyUI can leave offloaded under a partial load or stream under DynamicVRAM, see
    :class:`CastMPConv`), of the class ComfyUI's own loaders use (``patcher_class``: dynamic where
    DynamicVRAM is on, unless ``disable_dynamic``)."""
    dtype = resolve_dtype(weight_dtype, ckpt)
    offload = mm.unet_offload_device()
    net = with_cast_hooks(build_network(ckpt, dtype, device=offload))
    model = EDM2Model(net, ckpt, device=offload)
    return patcher_class(disable_dynamic)(model, load_device=mm.get_torch_device(), offload_device=offload)


def load_edm2_model(path: str, weight_dtype: str = "default", disable_dynamic: bool = False):
    """A ModelPatcher for the checkpoint at ``path`` that newer ComfyUI can load again by itself:
    ``cached_patcher_init`` names this loader, as ComfyUI's core loaders do, so that the multi-GPU
    split (``deepclone_multigpu``) and ``get_non_dynamic_delegate`` (``disable_dynamic``: the plain
    patcher) get a fresh copy of the weights."""
    patcher = model_from_checkpoint(read_checkpoint(path), weight_dtype, disable_dynamic)
    patcher.cached_patcher_init = (load_edm2_model, (path, weight_dtype))
    return patcher


# ----------------------------------------------------------------------------------------------
# Conditioning


def class_label_conditioning(indices, num_classes: int = 1000):
    """CONDITIONING carrying one-hot ``class_labels`` rows [k, num_classes] (k = len(indices)).

    ComfyUI repeats the rows to the batch (cycling when k < batch). An empty list gives a
    conditioning without labels (unconditional models; zero vector on conditional ones).
    The first element is a placeholder: EDM2 has no text conditioning.
    """
    extra = {}
    if indices:
        onehot = torch.zeros(len(indices), num_classes)
        onehot[torch.arange(len(indices)), torch.as_tensor(indices)] = 1.0
        extra["class_labels"] = onehot
    return [[torch.zeros(1, 1, 1), extra]]
