"""Checks and inputs the guiders read before sampling (framework-free: duck-typed on ComfyUI's
models, VAEs and conditioning lists). Each error names the input and what is allowed."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..common.errors import GFCGInputError
from .pixels import is_pixel_vae
from .references import LabelReference, TextReference, has_class_labels

log = logging.getLogger("comfyui_gfcg")


def check_vae(model, vae) -> None:
    """Before sampling: a clear error when the VAE does not fit the model (``model``: a ComfyUI
    BaseModel). Pixel-space models (3-channel "latents") take no VAE or the pixel_space one."""
    c = int(model.latent_format.latent_channels)
    vc = getattr(vae, "latent_channels", None)
    pixel_vae = is_pixel_vae(vae)
    if c == 3:
        if vae is not None and not pixel_vae:
            raise GFCGInputError(f"vae: the model works in pixel space (3 channels) but this VAE makes {vc}-channel "
                                 "latents; leave vae empty for pixel-space models (or use the pixel_space VAE)")
        return
    if vae is None:
        raise GFCGInputError(f"vae: the model makes {c}-channel latents; connect its VAE so that the classifier "
                             "can see pixels")
    if pixel_vae:
        raise GFCGInputError(f"vae: the pixel_space VAE cannot decode the model's {c}-channel latents; connect the "
                             "VAE that belongs to the model")
    if vc != c:
        raise GFCGInputError(f"vae: this VAE decodes {vc}-channel latents but the model makes {c}-channel ones; "
                             "connect the VAE that belongs to the model")


def check_guide_model(model, guide) -> None:
    """Autoguidance needs a guide in the main model's latent space and, for class-label models,
    with the same classes (an unconditional guide, without labels, is fine)."""
    a, b = model.latent_format, guide.latent_format
    if type(a) is not type(b) or a.latent_channels != b.latent_channels:
        raise GFCGInputError(f"guide_model: it works on {b.latent_channels}-channel {type(b).__name__} latents, the "
                             f"main model on {a.latent_channels}-channel {type(a).__name__} ones; autoguidance needs "
                             "a guide of the same family and latent space")
    la, lb = getattr(model, "label_dim", None), getattr(guide, "label_dim", None)
    if la and lb and la != lb:
        raise GFCGInputError(f"guide_model: it takes {lb} class labels, the main model {la}; autoguidance needs a "
                             "guide trained on the same classes")


def check_finite_latent(latent_image: torch.Tensor) -> None:
    """A clear error for NaN / Inf in the input latent (sampling would only return NaN images)."""
    if latent_image is not None and not bool(torch.isfinite(latent_image).all()):
        bad = int((~torch.isfinite(latent_image)).sum())
        raise ValueError(f"latent_image: the input latent holds {bad} NaN or infinite values (of "
                         f"{latent_image.numel()}); sampling would give NaN images. Check the node that made it "
                         "(e.g. a Load Latent file)")


def check_image_latent(latent: torch.Tensor, fmt=None) -> None:
    """Before sampling: GFCG judges images, so the latent must be an image latent [B, C, H, W] or a
    single-frame latent of a video-shaped family [B, C, 1, H, W] (ComfyUI's Wan21 format: Qwen-Image,
    Wan for images, Cosmos-Predict2, Anima); several frames (video) or other shapes are refused."""
    if latent is None or latent.ndim == 4:
        return
    name = type(fmt).__name__ if fmt is not None else "this model's"
    if latent.ndim == 5:
        if int(latent.shape[2]) == 1:
            return
        raise GFCGInputError(f"latent: a video latent of {int(latent.shape[2])} frames ({name} latents "
                             f"{list(latent.shape)}); the classifier judges single images, so GFCG needs one frame "
                             "(set the empty latent's length / frames to 1) or another guider for video")
    raise GFCGInputError(f"latent: {latent.ndim}-D latents ({name}, {list(latent.shape)}) are not images; GFCG needs "
                         "image latents [batch, channels, height, width] or one video frame")


def per_row_classes(positive, batch: int) -> Optional[torch.Tensor]:
    """Each image's desired class from class-label conditioning (e.g. EDM2 Class Label ``3;5``):
    the one-hot ``class_labels`` rows [k, L] cycled over the batch, as ComfyUI repeats a cond to the
    batch (row r takes label r mod k). None for one label (the node's desired_class then applies)."""
    if not has_class_labels(positive):
        return None
    labels = positive[0][1]["class_labels"]
    if labels.ndim != 2 or labels.shape[0] <= 1:
        return None
    empty = (labels.abs().sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise GFCGInputError(f"positive: class label row {empty[0]} is empty (no class); per-image classes need one "
                             "class per row")
    classes = labels.argmax(1).long()
    return classes[torch.arange(batch) % classes.shape[0]]


def ignores_class_labels(model, num_labels: int) -> bool:
    """Whether a class-label model drops the label (an unconditional network): its ``extra_conds``
    for class 0 and class 1 are the same (no label-derived input). A model whose extra_conds needs
    more than the label to answer counts as conditional."""
    if num_labels < 2:
        return False
    eye = torch.eye(num_labels)[:2]
    try:
        a, b = (model.extra_conds(class_labels=eye[i:i + 1]) for i in range(2))
    except Exception:  # noqa: BLE001 -- needs the full sampling context: assume it reads the label
        return False
    if a.keys() != b.keys():
        return False
    for k in a:
        va, vb = getattr(a[k], "cond", a[k]), getattr(b[k], "cond", b[k])
        if not (torch.is_tensor(va) and torch.is_tensor(vb) and va.shape == vb.shape and torch.equal(va, vb)):
            return False
    return True


def check_label_use(model, guide, reference, combine: str, mode: str) -> None:
    """GFCG with class labels needs networks that read them: an unconditional main model makes
    D_ref = D1 (GFCG a silent no-op); an unconditional guide in swap mode makes G(c_ref) = G(0)
    (the reference class changes nothing)."""
    if not isinstance(reference, LabelReference):
        return
    n = reference.num_labels
    if ignores_class_labels(model, n):
        raise GFCGInputError("model: this network ignores class labels (an unconditional model), so the reference "
                             "class changes nothing and GFCG would do nothing; use the class-conditional model as "
                             "the main model (an unconditional network works as the autoguidance guide, in additive "
                             "mode)")
    if combine == "atg" and mode == "swap" and guide is not None and ignores_class_labels(guide, n):
        raise GFCGInputError("guide_model: this guide ignores class labels (an unconditional guide); in swap mode "
                             "the reference branch runs on the guide, G(c_ref) = G(no class), so the reference class "
                             "changes nothing. Use mode = additive (the reference runs on the main model) or a "
                             "class-conditional guide")


# whether the log has said that a CLIP on a class-label model is ignored (once per process)
_clip_ignored_said = False


def make_reference(positive, class_names, clip=None, prompt_template: str = "a photo of a {}"):
    """Reference conditioning source: the class label carried by ``positive`` (class-label models:
    EDM2, the testbed), else text through ``clip``. On a class-label model a connected CLIP is
    ignored (the label is what the network reads; a text reference would leave the label, and so the
    model's prediction, unchanged) and the log says so once."""
    global _clip_ignored_said
    if has_class_labels(positive):
        ref = LabelReference(positive)
        if ref.num_labels != len(class_names):
            raise GFCGInputError(f"classifier: it has {len(class_names)} classes but the model's class labels have "
                                 f"{ref.num_labels}; the classifier must classify the model's own classes")
        if clip is not None and not _clip_ignored_said:
            _clip_ignored_said = True
            log.warning("clip: the positive conditioning carries a class label (a class-label model such as EDM2), "
                        "so the reference is that label set to the reference class; the connected CLIP and "
                        "prompt_template are ignored (disconnect the CLIP to silence this; said once)")
        return ref
    if clip is not None:
        return TextReference(clip, prompt_template, class_names, positive=positive)
    raise GFCGInputError("clip: the positive conditioning carries no class label, so the reference conditioning "
                         "must be built from text; connect the model's CLIP")
