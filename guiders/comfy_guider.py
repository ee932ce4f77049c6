"""The GFCG GUIDER for ComfyUI's sampler (imports ComfyUI; the math is in ``engine``/``core``).

``GFCGGuider`` is a ``comfy.samplers.CFGGuider`` whose ``predict_noise`` hands each evaluation to
:class:`~.engine.GFCGEngine`. The engine asks for branches; this module evaluates them:

* all branches one model needs in one evaluation go through ONE forward when the conds are plain
  (one entry each, no area/mask/ControlNet/hooks, no model wrappers): the rows of each branch
  (the whole batch, or only the confused samples) are concatenated, as ComfyUI's own
  ``calc_cond_batch`` does for equal-sized branches;
* otherwise it falls back to ComfyUI's ``calc_cond_batch`` (one call per distinct row set).

The guide model (autoguidance), the VAE and the classifier are attached as additional models, so
ComfyUI loads them together with the main model; the guide model gets its own processed conds.
The model's pre-/post-CFG hooks run around the combination, as ComfyUI's guiders do.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers

from ..classifiers.timm_classifier import straight_through_clamp
from .callconv import call_with_supported, extra_arguments, named_arguments, supported_kwargs
from .config import GFCGConfig, GFCGInputError
from .engine import Branch, GFCGEngine
from .grad_copy import plain_resident_copy
from .references import LabelReference, TextReference, has_class_labels

log = logging.getLogger("comfyui_gfcg")


# ------------------------------------------------------------------------------------------------
# row-subset conds and the fused forward
# ------------------------------------------------------------------------------------------------

def _rows_of_cond(c, rows: Optional[torch.Tensor], batch: int):
    """A processed model cond (comfy.conds.CONDxxx) for ``rows`` of a ``batch``-sized evaluation:
    per-sample tensors are indexed, not truncated (``repeat_to_batch_size`` would take the first rows)."""
    p = c.process_cond(batch_size=batch, area=None)
    if rows is None:
        return p
    v = p.cond
    if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == batch:
        return p._copy_with(v[rows.to(v.device)])
    if isinstance(v, list) and all(torch.is_tensor(t) and t.shape[0] == batch for t in v):
        return p._copy_with([t[rows.to(t.device)] for t in v])
    return p


_PLAIN_BLOCKERS = ("area", "mask", "control", "gligen", "hooks", "default")


def _plain(cond_list) -> bool:
    return cond_list is not None and len(cond_list) == 1 and not any(k in cond_list[0] for k in _PLAIN_BLOCKERS)


def _in_time_range(cond: dict, t: torch.Tensor) -> bool:
    if "timestep_start" in cond and t[0] > cond["timestep_start"]:
        return False
    if "timestep_end" in cond and t[0] < cond["timestep_end"]:
        return False
    return True


# model_options keys under which ComfyUI runs its own batching (wrappers, context windows, the
# multi-GPU split of newer ComfyUI): the fused forward steps aside and calc_cond_batch runs.
_OWN_PATH_KEYS = ("model_function_wrapper", "context_handler", "multigpu_clones")


def _fusable(model, entries, t, model_options) -> bool:
    if any(model_options.get(k) is not None for k in _OWN_PATH_KEYS):
        return False
    topts = model_options.get("transformer_options", {})
    if topts.get("patches") or topts.get("patches_replace"):
        return False  # attention patches split the batch into equal chunks
    if comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, model_options,
                                                 is_model_options=True):
        return False
    if not all(_plain(c) and _in_time_range(c[0], t) for c, _, _ in entries):
        return False
    first = {k: v.process_cond(batch_size=1, area=None) for k, v in entries[0][0][0]["model_conds"].items()}
    for c, _, _ in entries[1:]:
        other = {k: v.process_cond(batch_size=1, area=None) for k, v in c[0]["model_conds"].items()}
        if first.keys() != other.keys() or not all(first[k].can_concat(other[k]) for k in first):
            return False
    return True


def batched_forward(model, entries: Sequence[Tuple[list, Optional[torch.Tensor], int]], x: torch.Tensor,
                    t: torch.Tensor, model_options: dict) -> List[torch.Tensor]:
    """Denoised predictions for ``entries`` = [(cond_list, rows or None, cond_or_uncond)], each on
    ``x[rows]``. One model forward when the conds allow it, else ComfyUI's ``calc_cond_batch``."""
    b = x.shape[0]
    sizes = [b if rows is None else int(rows.numel()) for _, rows, _ in entries]
    if len(entries) > 1 and _fusable(model, entries, t, model_options):
        shape = [sum(sizes)] + list(x.shape[1:])
        if _memory_required(model, shape, entries) * 1.5 < _free_memory(model, x.device):
            return _fused(model, entries, sizes, x, t, model_options)
    # fallback: whole-batch entries in one calc_cond_batch call, then one call per row subset
    outs: List[Optional[torch.Tensor]] = [None] * len(entries)
    whole = [i for i, (_, rows, _) in enumerate(entries) if rows is None]
    if whole:
        res = comfy.samplers.calc_cond_batch(model, [entries[i][0] for i in whole], x, t, model_options)
        for i, r in zip(whole, res):
            outs[i] = r
    for i, (cond_list, rows, _) in enumerate(entries):
        if rows is not None:
            sub = [_slice_cond_entry(c, rows, b) for c in cond_list]
            outs[i] = comfy.samplers.calc_cond_batch(model, [sub], x[rows], t[rows], model_options)[0]
    return outs


def _free_memory(model, device) -> int:
    """Free memory for the model's forward as ComfyUI's own batching sees it: the patcher's view
    where the patcher has one (newer ComfyUI, which accounts for dynamically loaded weights), else
    model management's."""
    patcher = getattr(model, "current_patcher", None)
    if patcher is not None and hasattr(patcher, "get_free_memory"):
        return patcher.get_free_memory(device)
    return comfy.model_management.get_free_memory(device)


def _memory_required(model, shape, entries) -> float:
    """``model.memory_required`` for the fused batch, with the conds' shapes where it takes them."""
    kw = {}
    if "cond_shapes" in supported_kwargs(model.memory_required, {"cond_shapes": None}):
        shapes: Dict[str, list] = {}
        for cond_list, rows, _ in entries:
            for k, v in cond_list[0]["model_conds"].items():
                size = getattr(v, "size", None)
                if callable(size):
                    try:
                        shapes.setdefault(k, []).append(size())
                    except Exception:  # a cond type without a meaningful size
                        pass
        kw["cond_shapes"] = shapes
    return model.memory_required(shape, **kw)


def _slice_cond_entry(c: dict, rows: torch.Tensor, batch: int) -> dict:
    out = dict(c)
    out["model_conds"] = {k: _rows_of_cond(v, rows, batch) for k, v in c["model_conds"].items()}
    m = c.get("mask")
    if torch.is_tensor(m) and m.shape[0] == batch and batch > 1:
        out["mask"] = m[rows.to(m.device)]
    return out


def _fused(model, entries, sizes, x, t, model_options) -> List[torch.Tensor]:
    b = x.shape[0]
    inputs, conds, ts, cou, uuids = [], [], [], [], []
    for (cond_list, rows, which), n in zip(entries, sizes):
        c = cond_list[0]
        inputs.append(x if rows is None else x[rows])
        ts.append(t if rows is None else t[rows])
        conds.append({k: _rows_of_cond(v, rows, b) for k, v in c["model_conds"].items()})
        cou.append(which)
        uuids.append(c.get("uuid"))
    call_with_supported(model.current_patcher.prepare_state, t, model_options=model_options)
    topts = model.current_patcher.apply_hooks(hooks=None)
    if "transformer_options" in model_options:
        topts = comfy.patcher_extension.merge_nested_dicts(topts, model_options["transformer_options"], copy_dict1=False)
    topts["cond_or_uncond"] = cou
    topts["uuids"] = uuids
    topts["sigmas"] = t
    c = comfy.samplers.cond_cat(conds)
    c["transformer_options"] = topts
    out = model.apply_model(torch.cat(inputs), torch.cat(ts), **c)
    return list(out.split(sizes))


# ------------------------------------------------------------------------------------------------
# the guider
# ------------------------------------------------------------------------------------------------

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


def is_pixel_vae(vae) -> bool:
    """ComfyUI's pixel_space VAE (3 channels, no downscale): it decodes nothing."""
    return vae is not None and getattr(vae, "latent_channels", None) == 3 and getattr(vae, "downscale_ratio", 8) == 1


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


def additional_models(classifier, vae, decode: str) -> list:
    """The patchers ComfyUI should load with the main model: the classifier, and the VAE where its
    decoder runs during sampling (not for decode = taesd / latent_rgb, nor the pixel_space VAE,
    which decodes nothing: pixel-space x0 is mapped as it is)."""
    extra = [classifier.patcher]
    if vae is not None and getattr(vae, "patcher", None) is not None and decode == "vae" and not is_pixel_vae(vae):
        extra.append(vae.patcher)
    return extra


def single_device(patcher):
    """``patcher`` without per-GPU clones of its own (ComfyUI's MultiGPU CFG Split, v0.33+): a guide
    model runs on the main device. Its clones would otherwise join the main model's split."""
    if not getattr(patcher, "get_additional_models_with_key", None) or not patcher.get_additional_models_with_key("multigpu"):
        return patcher
    log.warning("guide_model: its MultiGPU CFG Split is not used; the guide runs on %s", patcher.load_device)
    p = patcher.clone()
    p.remove_additional_models("multigpu")
    return p


# model_options keys of ComfyUI's multi-GPU split (v0.33+): they describe the MAIN model's clones
_MULTIGPU_KEYS = ("multigpu_clones", "multigpu_thread_pool")


def guide_options(model_options: dict) -> dict:
    """The model options for the guide model's evaluations: the main model's multi-GPU clones
    removed (ComfyUI would otherwise run the main network's clones on the guide's branches)."""
    if not any(k in model_options for k in _MULTIGPU_KEYS):
        return model_options
    return {k: v for k, v in model_options.items() if k not in _MULTIGPU_KEYS}


def check_finite_latent(latent_image: torch.Tensor) -> None:
    """A clear error for NaN / Inf in the input latent (sampling would only return NaN images)."""
    if latent_image is not None and not bool(torch.isfinite(latent_image).all()):
        bad = int((~torch.isfinite(latent_image)).sum())
        raise ValueError(f"latent_image: the input latent holds {bad} NaN or infinite values (of "
                         f"{latent_image.numel()}); sampling would give NaN images. Check the node that made it "
                         "(e.g. a Load Latent file)")


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


def make_reference(positive, class_names, clip=None, prompt_template: str = "a photo of a {}"):
    """Reference conditioning source: text through ``clip`` when given, else the class label
    carried by ``positive`` (class-label models)."""
    if clip is not None:
        return TextReference(clip, prompt_template, class_names, positive=positive)
    if has_class_labels(positive):
        ref = LabelReference(positive)
        if ref.num_labels != len(class_names):
            raise GFCGInputError(f"classifier: it has {len(class_names)} classes but the model's class labels have "
                                 f"{ref.num_labels}; the classifier must classify the model's own classes")
        return ref
    raise GFCGInputError("clip: the positive conditioning carries no class label, so the reference conditioning "
                         "must be built from text; connect the model's CLIP")


def report_progress(text: str) -> None:
    """Show ``text`` on the node that is executing (the sampler) through ComfyUI's progress-text
    channel; nothing when no server runs (scripts, tests in-process)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return
    ctx, srv = get_executing_context(), getattr(PromptServer, "instance", None)
    if ctx is not None and srv is not None:
        srv.send_progress_text(text, ctx.node_id)


def report_trace(engine, class_names, tau: float, reported: int) -> int:
    """Report the trace entries after the first ``reported`` ones; returns the new count."""
    from .trace_plot import progress_line

    trace = engine.trace
    if len(trace) > reported:
        report_progress(progress_line(trace[-1], engine.n_steps, class_names, tau))
    return len(trace)


def pre_cfg_hooks(model_options, positive, negative, cond_scale, timestep, x, model):
    """(d1, uncond) -> (d1, uncond) through the model's ``sampler_pre_cfg_function`` list, with the
    arguments ComfyUI's own CFG passes them."""
    def run(d1, uncond):
        out = [d1, uncond]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": [positive, negative], "conds_out": out, "cond_scale": cond_scale, "timestep": timestep,
                      "input": x, "sigma": timestep, "model": model, "model_options": model_options})
        return out[0], out[1]
    return run


def comfy_cfg_function(model, model_options, positive, negative, x, timestep):
    """The CFG part through ComfyUI's own ``cfg_function`` when the model carries a CFG hook
    (``sampler_cfg_function``, e.g. RescaleCFG), else None (the engine's ``core.cfg``, the same
    formula ComfyUI uses without a hook). ComfyUI's post-CFG hooks are left out here: they run once,
    after GFCG's own terms (``post_cfg_hooks``). A skipped negative (cfg = 1) is ComfyUI's zeros."""
    if "sampler_cfg_function" not in model_options:
        return None
    opts = {k: v for k, v in model_options.items() if k != "sampler_post_cfg_function"}

    def cfg(d1, d_neg, w):
        scale = float(w) if not torch.is_tensor(w) else w.to(d1.dtype).view(-1, *([1] * (d1.ndim - 1)))
        un = torch.zeros_like(d1) if d_neg is None else d_neg
        return comfy.samplers.cfg_function(model, d1, un, scale, x, timestep, model_options=opts, cond=positive,
                                           uncond=negative if d_neg is not None else None)
    return cfg


def post_cfg_hooks(model_options, res, positive, negative, cond_scale, timestep, x, model) -> torch.Tensor:
    """The guided estimate ``res.denoised`` through the model's ``sampler_post_cfg_function`` list."""
    denoised = res.denoised
    for fn in model_options.get("sampler_post_cfg_function", []):
        denoised = fn({"denoised": denoised, "cond": positive, "uncond": negative, "cond_scale": cond_scale,
                       "model": model, "uncond_denoised": res.uncond, "cond_denoised": res.cond, "sigma": timestep,
                       "model_options": model_options, "input": x})
    return denoised


# the arguments of CFGGuider.inner_sample that every supported ComfyUI passes (v0.3.64's list)
_INNER_SAMPLE_ARGS = ("noise", "latent_image", "device", "sampler", "sigmas", "denoise_mask", "callback",
                      "disable_pbar", "seed")


class GFCGGuider(comfy.samplers.CFGGuider):
    """GFCG alone, or stacked with CFG (negative conditioning) or autoguidance (guide model)."""

    def __init__(self, model_patcher, config: GFCGConfig, classifier, positive, vae=None, clip=None,
                 prompt_template: str = "a photo of a {}", combine: str = "none", mode: str = "additive",
                 scale: float = 1.0, negative=None, guide_patcher=None, decode: str = "vae",
                 decode_resolution: float = 1.0):
        if not 0 <= config.desired_class < classifier.classifier.num_classes:
            raise GFCGInputError(f"desired_class: index {config.desired_class} is out of range for "
                                 f"{classifier.classifier.num_classes} classes")
        if combine == "cfg" and negative is None:
            raise GFCGInputError("negative: stacking with CFG needs the negative conditioning")
        if combine == "atg" and guide_patcher is None:
            raise GFCGInputError("guide_model: stacking with autoguidance needs a guide model")
        self.recipe = dict(model_patcher=model_patcher, config=config, classifier=classifier, positive=positive,
                           vae=vae, clip=clip, prompt_template=prompt_template, decode=decode,
                           decode_resolution=decode_resolution)
        check_vae(model_patcher.model, vae)
        mp = model_patcher.clone()
        extra = additional_models(classifier, vae, decode)
        if guide_patcher is not None:
            if guide_patcher.is_clone(model_patcher):
                raise GFCGInputError("guide_model: it is the same network as the main model; autoguidance needs a "
                                     "separate, weaker model (e.g. EDM2 xs for s)")
            check_guide_model(model_patcher.model, guide_patcher.model)
            guide_patcher = single_device(guide_patcher)
            extra.append(guide_patcher)
        mp.set_additional_models("gfcg", extra)
        super().__init__(mp)
        self.engine = GFCGEngine(config, combine=combine, mode=mode, scale=float(scale))
        self.classifier = classifier
        self.reference = make_reference(positive, classifier.class_names, clip, prompt_template)
        check_label_use(model_patcher.model, guide_patcher.model if guide_patcher is not None else None,
                        self.reference, combine, mode)
        self.decoder = PixelDecoder(vae, decode, decode_resolution)
        self.guide_patcher = guide_patcher
        self.cfg = float(scale) if combine == "cfg" else 1.0
        self.set_conds(positive, negative if combine == "cfg" else None)

    def combined(self, combine: str, mode: str, scale: float, negative=None, guide_patcher=None) -> "GFCGGuider":
        """A new guider with the same GFCG settings stacked on CFG or autoguidance (inputs stay untouched)."""
        return GFCGGuider(**self.recipe, combine=combine, mode=mode, scale=scale, negative=negative,
                          guide_patcher=guide_patcher)

    # -- conds
    def set_conds(self, positive, negative=None):
        conds = {"positive": positive}
        if negative is not None:
            conds["negative"] = negative
        self.inner_set_conds(conds)

    def _process(self, model, raw) -> list:
        conds = {"positive": comfy.sampler_helpers.convert_cond(raw)}
        return self._process_conds(model, conds)["positive"]

    def _process_conds(self, model, conds: dict) -> dict:
        """ComfyUI's ``process_conds`` for ``conds`` with this run's inputs (and whatever newer
        arguments the sampler passed that process_conds takes, e.g. ``latent_shapes``)."""
        run = self._run
        return call_with_supported(comfy.samplers.process_conds, model, run["noise"], conds, run["device"],
                                   run["latent"], run["denoise_mask"], run["seed"], **run["extra"])

    def _reference_cond(self, which: str, k: int) -> list:
        key = (which, int(k))
        if key not in self._ref_cache:
            if which == "main":
                self._ref_cache[key] = self._process(self.inner_model, self.reference(int(k)))
            else:
                self._ref_cache[key] = self._process(self.guide_patcher.model, self.reference(int(k)))
        return self._ref_cache[key]

    # -- sampling
    def inner_sample(self, *args, **kwargs):
        """Per-run setup, then ComfyUI's own ``inner_sample`` with the arguments exactly as given
        (read by name from the parent's signature, so arguments newer ComfyUI adds pass through)."""
        a = named_arguments(comfy.samplers.CFGGuider.inner_sample, args, kwargs)
        noise, latent_image, sigmas = a["noise"], a["latent_image"], a["sigmas"]
        check_finite_latent(latent_image)
        latent = latent_image
        if latent is not None and torch.count_nonzero(latent) > 0:
            latent = self.inner_model.process_latent_in(latent)
        extra = extra_arguments(a, _INNER_SAMPLE_ARGS)
        self._run = {"noise": noise, "device": a["device"], "latent": latent, "denoise_mask": a["denoise_mask"],
                     "seed": a["seed"], "extra": extra}
        self._ref_cache: Dict[Tuple[str, int], list] = {}
        if self.guide_patcher is not None:
            g = self.guide_patcher
            if "latent_shapes" in extra and hasattr(g.model, "latent_shapes"):
                g.model.latent_shapes = extra["latent_shapes"]
            gconds = {"positive": [c.copy() for c in self.original_conds["positive"]]}
            self.guide_conds = self._process_conds(g.model, gconds)
            g.pre_run()
        self.engine.desired_rows = per_row_classes(self.recipe["positive"], int(noise.shape[0]))
        self.engine.begin(sigmas, a["seed"], percent_to_sigma=self.inner_model.model_sampling.percent_to_sigma,
                          sampler_options=getattr(a["sampler"], "extra_options", None))
        self._reported = 0
        return super().inner_sample(*args, **kwargs)

    def _evaluate(self, which: str, model, conds: Dict[str, list], x, t, model_options,
                  branches: List[Branch]) -> List[torch.Tensor]:
        entries, slots = [], []
        for bi, br in enumerate(branches):
            if br.cond != "reference":
                entries.append((conds[br.cond], br.rows, 1 if br.cond == "negative" else 0))
                slots.append((bi, None))
                continue
            for k in torch.unique(br.classes).tolist():   # one entry per reference class
                sel = (br.classes == k).nonzero().squeeze(1)
                entries.append((self._reference_cond(which, k), br.rows[sel], 0))
                slots.append((bi, sel))
        outs = batched_forward(model, entries, x, t, model_options)
        result: List[Optional[torch.Tensor]] = [None] * len(branches)
        for (bi, sel), o in zip(slots, outs):
            if sel is None:
                result[bi] = o
            else:
                if result[bi] is None:
                    result[bi] = o.new_empty((int(branches[bi].rows.numel()),) + tuple(o.shape[1:]))
                result[bi][sel] = o
        return result

    def _classify(self, x0: torch.Tensor) -> torch.Tensor:
        pixels = self.decoder(self.inner_model, x0)
        module = self.classifier.classifier
        dev = next(module.parameters()).device
        return module(pixels if pixels.device == dev else pixels.to(dev))

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        conds = self.conds
        positive, negative = conds.get("positive"), conds.get("negative")

        def main(branches):
            return self._evaluate("main", self.inner_model, conds, x, timestep, model_options, branches)

        def guide(branches):
            return self._evaluate("guide", self.guide_patcher.model, self.guide_conds, x, timestep,
                                  guide_options(model_options), branches)

        pre_cfg = pre_cfg_hooks(model_options, positive, negative, self.cfg, timestep, x, self.inner_model)
        # as ComfyUI's sampling_function: cfg = 1 skips the negative unless the sampler asks for it (CFG++)
        self.engine.skip_unit_negative = not model_options.get("disable_cfg1_optimization", False)
        res = self.engine.denoise(x, float(timestep.flatten()[0]), main, self._classify,
                                  guide if self.guide_patcher is not None else None, pre_cfg,
                                  comfy_cfg_function(self.inner_model, model_options, positive, negative, x, timestep))
        self._reported = report_trace(self.engine, self.classifier.class_names, self.engine.config.tau,
                                      self._reported)
        return post_cfg_hooks(model_options, res, positive, negative, res.scale, timestep, x, self.inner_model)
