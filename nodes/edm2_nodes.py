"""EDM2 nodes: sockets only; the network, reading and latent maths live in ``edm2``."""
from __future__ import annotations

from ..classifiers.vocab import imagenet_class_names, resolve_class
from ..edm2.checkpoint import CheckpointError
from ..edm2.comfy_model import (DTYPES, checkpoint_path, class_label_conditioning, empty_latent, list_checkpoints,
                                load_edm2_model, register_folder)
from ..edm2.latents import comfy_image_to_edm2_pixels, edm2_pixels_to_comfy_encoder_input
from ..common.errors import GFCGInputError
from ._api import io

register_folder()
CATEGORY = "sampling/gfcg/edm2"
MAX_LABELS = 4096


class LoadEDM2Model(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GFCGLoadEDM2Model",
            display_name="Load EDM2 Model",
            category=CATEGORY,
            description="Loads an NVlabs EDM2 checkpoint (ImageNet-512 latent or ImageNet-64 pixel models) with the "
                        "pack's own network. .pkl files are read with a restricted unpickler that never runs the code "
                        "embedded in them; .safetensors files come from 'python -m comfyui_gfcg.edm2 convert'. The MODEL "
                        "samples with EDM settings (sigma_data 0.5, sigmas 0.002..80): use KSampler (heun, karras, 32 "
                        "steps = EDM2's sampler) or SamplerCustomAdvanced, and as main or guide model of the GFCG "
                        "nodes. Weights are NVIDIA's, CC BY-NC-SA 4.0.",
            inputs=[
                io.Combo.Input("ckpt_name", options=list_checkpoints(),
                               tooltip="EDM2 file in models/edm2 (or a file in models/diffusion_models whose name "
                                       "contains 'edm2'): an NVlabs .pkl, e.g. edm2-img512-s-2147483-0.130.pkl, or a "
                                       "converted .safetensors."),
                io.Combo.Input("weight_dtype", options=["default"] + list(DTYPES), default="default",
                               tooltip="Precision of the network trunk. default: ComfyUI's choice for this device "
                                       "(fp16 on most GPUs, as NVlabs ran it; fp32 on CPU). The embeddings and the "
                                       "weight normalisation always run in fp32."),
            ],
            outputs=[io.Model.Output(tooltip="The EDM2 model: an EDM denoiser taking class labels from EDM2 Class Label.")],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name, weight_dtype="default"):
        if not ckpt_name or checkpoint_path(ckpt_name) is None:
            return f"ckpt_name: EDM2 file {ckpt_name!r} not found in models/edm2 or models/diffusion_models"
        return True

    @classmethod
    def execute(cls, ckpt_name, weight_dtype="default") -> io.NodeOutput:
        path = checkpoint_path(ckpt_name)
        if path is None:
            raise ValueError(f"ckpt_name: EDM2 file {ckpt_name!r} not found")
        try:
            return io.NodeOutput(load_edm2_model(path, weight_dtype))
        except CheckpointError as e:
            raise ValueError(f"ckpt_name: {e}") from None


def parse_classes(text: str, names, input_name: str = "class_name"):
    """'goldfish' / '207' / 'tench, 1; 207' -> class indices (';' or '|' separate several labels)."""
    text = (text or "").strip()
    if not text:
        return []
    parts = [p.strip() for p in text.replace("|", ";").split(";")]
    if any(not p for p in parts):
        raise GFCGInputError(f"{input_name}: empty entry in {text!r}; separate several classes with ';'")
    if len(parts) > MAX_LABELS:
        raise GFCGInputError(f"{input_name}: {len(parts)} labels is too many (at most {MAX_LABELS})")
    return [resolve_class(p, names, input_name) for p in parts]


class EDM2ClassLabel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GFCGEDM2ClassLabel",
            display_name="EDM2 Class Label",
            category=CATEGORY,
            description="Class conditioning for EDM2 (and other one-hot class-label models): an ImageNet class by "
                        "name or index, as a CONDITIONING with a one-hot 'class_labels' row. Several classes separated "
                        "by ';' give one row per image (cycled over the batch). Empty = no label: what unconditional "
                        "models take (a conditional EDM2 net then sees a zero label, a mode it was not trained for). "
                        "Positive and negative conditionings of this kind run in one model forward.",
            inputs=[
                io.String.Input("class_name", default="golden retriever",
                                tooltip="ImageNet-1k class: a name or synonym ('golden retriever', 'goldfish'), an index "
                                        "0..999 ('207'), or several separated by ';' for per-image labels. Empty for "
                                        "no label."),
                io.Int.Input("num_classes", default=1000, min=1, max=100000, optional=True,
                             tooltip="Width of the one-hot vector: 1000 for EDM2's ImageNet models. With another "
                                     "width, only indices are accepted."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Conditioning with 'class_labels' [k, num_classes].")],
        )

    @classmethod
    def validate_inputs(cls, class_name, num_classes=1000):
        try:
            parse_classes(class_name, _vocab(num_classes))
        except GFCGInputError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, class_name, num_classes=1000) -> io.NodeOutput:
        try:
            idx = parse_classes(class_name, _vocab(num_classes))
        except GFCGInputError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(class_label_conditioning(idx, num_classes))


def _vocab(num_classes: int):
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class {i}" for i in range(num_classes)]


class EDM2EmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GFCGEDM2EmptyLatent",
            display_name="EDM2 Empty Latent",
            category=CATEGORY,
            description="Empty LATENT of EDM2's shape: img512 = 4x64x64 SD-VAE latents (filled with EDM2's raw latent "
                        "mean, i.e. exactly 0 in the model's normalised space), img64 = 3x64x64 pixels; 'pixels' "
                        "families at other sizes (the pack's 32x32 testbed models) through 'resolution'.",
            inputs=[
                io.Combo.Input("family", options=["img512", "img64"], default="img512",
                               tooltip="img512: ImageNet-512 latent models (edm2-img512-*); img64: ImageNet-64 pixel "
                                       "models (edm2-img64-*)."),
                io.Int.Input("batch_size", default=1, min=1, max=4096, tooltip="Number of images."),
                io.Int.Input("resolution", default=64, min=8, max=512, step=8, optional=True,
                             tooltip="Side of the latent: 64 for both EDM2 families (img512: 64x64 latents = "
                                     "512x512 images; img64: 64x64 pixels); 32 for the pack's testbed models "
                                     "(family img64, pixels)."),
            ],
            outputs=[io.Latent.Output(tooltip="The empty latent batch.")],
        )

    @classmethod
    def execute(cls, family, batch_size, resolution=64) -> io.NodeOutput:
        return io.NodeOutput({"samples": empty_latent(family, batch_size, int(resolution))})


def _is_pixel_space(vae) -> bool:
    return getattr(vae, "latent_channels", None) == 3 and getattr(vae, "downscale_ratio", None) == 1


class EDM2VAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GFCGEDM2VAEDecode",
            display_name="EDM2 VAE Decode",
            category=CATEGORY,
            description="Decodes EDM2 results with the right colours. img512 latents: EDM2 reads the SD VAE's output "
                        "as a [0,1] image while ComfyUI's VAE Decode assumes [-1,1] (washed-out result); this node "
                        "returns clamp(2*decoded - 1). Use the SD1.5 ft-MSE VAE (vae-ft-mse-840000-ema-pruned). img64 "
                        "(3-channel pixel) latents are mapped from [-1,1] to [0,1] directly; the VAE is not used.",
            inputs=[
                io.Latent.Input("samples", tooltip="EDM2 latents from the sampler."),
                io.Vae.Input("vae", tooltip="The SD1.5 ft-MSE VAE for img512 latents (ignored for img64)."),
            ],
            outputs=[io.Image.Output(tooltip="Decoded images in [0,1].")],
        )

    @classmethod
    def execute(cls, samples, vae) -> io.NodeOutput:
        z = samples["samples"]
        if z.ndim != 4 or z.shape[1] not in (3, 4):
            raise ValueError(f"samples: expected EDM2 latents [B, 4, H, W] (img512) or [B, 3, H, W] (img64), "
                             f"got shape {tuple(z.shape)}")
        if z.shape[1] == 3:
            return io.NodeOutput(((z.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu())
        if _is_pixel_space(vae) or getattr(vae, "latent_channels", 4) != 4:
            raise ValueError("vae: img512 EDM2 latents need the SD1.5 VAE (vae-ft-mse-840000-ema-pruned), "
                             f"got a VAE with {getattr(vae, 'latent_channels', '?')} latent channels")
        return io.NodeOutput(comfy_image_to_edm2_pixels(vae.decode(z)))


class EDM2VAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GFCGEDM2VAEEncode",
            display_name="EDM2 VAE Encode",
            category=CATEGORY,
            description="Encodes images for EDM2 img2img: with the SD1.5 VAE the image p in [0,1] is fed to the VAE "
                        "as is (EDM2's convention; ComfyUI's VAE Encode would feed 2p-1); with the pixel_space VAE "
                        "(img64) the latent is 2p-1.",
            inputs=[
                io.Image.Input("pixels", tooltip="Images in [0,1] (512x512 for img512, 64x64 for img64)."),
                io.Vae.Input("vae", tooltip="The SD1.5 ft-MSE VAE (img512) or the 'pixel_space' VAE (img64)."),
            ],
            outputs=[io.Latent.Output(tooltip="Latents for the EDM2 model.")],
        )

    @classmethod
    def execute(cls, pixels, vae) -> io.NodeOutput:
        if _is_pixel_space(vae):
            return io.NodeOutput({"samples": vae.encode(pixels[..., :3])})
        return io.NodeOutput({"samples": vae.encode(edm2_pixels_to_comfy_encoder_input(pixels[..., :3]))})


EDM2_NODES = [LoadEDM2Model, EDM2ClassLabel, EDM2EmptyLatent, EDM2VAEDecode, EDM2VAEEncode]

__all__ = ["EDM2_NODES", "parse_classes"]
