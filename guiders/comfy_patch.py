"""GFCG as a MODEL patch, for KSampler and KSamplerAdvanced (imports ComfyUI).

The patch is an OUTER_SAMPLE wrapper (ComfyUI's ``patcher_extension``): when KSampler or
KSamplerAdvanced (ComfyUI's plain ``CFGGuider``) samples the patched model, the wrapper takes that
guider's positive, negative and cfg and samples through a :class:`~.comfy_guider.GFCGGuider` built
from them: GFCG stacked on CFG with the KSampler's cfg (at cfg = 1 the negative is skipped as
ComfyUI skips it, which is GFCG alone). Any other guider that samples the model (a GFCG Guider, the
gradient guider, Guider_Basic, DualCFG, another pack's) is left alone. The reference branch is therefore
evaluated inside the patch by the very code the GUIDER node runs, so both give the same result
for the same settings (a test checks it bit for bit).

An inpainting mask (``denoise_mask``) is prepared once, by the sampler's own guider: ComfyUI prepares it
before the OUTER_SAMPLE wrappers (``CFGGuider.sample``, v0.33) or inside ``outer_sample`` (v0.3.64),
so the wrapper hands the GFCG guider's ``outer_sample`` the mask exactly as it got it and runs
``GFCGGuider.sample`` without one (preparing a prepared [B, C, h, w] mask again gives every image the
first image's mask).
"""
from __future__ import annotations

import inspect
from typing import Optional

import comfy.patcher_extension
import comfy.samplers

from .callconv import named_arguments
from .comfy_guider import GFCGGuider
from ..common.errors import GFCGInputError
from .config import GFCGConfig

WRAPPER_KEY = "comfyui_gfcg.model_patch"


def raw_conditioning(converted: list) -> list:
    """ComfyUI's CONDITIONING ([[cross_attn, extras], ...]) back from the converted list a
    CFGGuider keeps (``sampler_helpers.convert_cond``: extras with ``cross_attn`` and ``uuid``)."""
    out = []
    for c in converted:
        extras = {k: v for k, v in c.items() if k not in ("cross_attn", "uuid")}
        out.append([c.get("cross_attn"), extras])
    return out


class GFCGSampleWrapper:
    """The OUTER_SAMPLE wrapper that a GFCG Model Patch adds to a model."""

    def __init__(self, config: GFCGConfig, classifier, vae=None, clip=None, prompt_template: str = "a photo of a {}",
                 mode: str = "additive", decode: str = "vae", decode_resolution: float = 1.0):
        self.settings = dict(config=config, classifier=classifier, vae=vae, clip=clip, prompt_template=prompt_template,
                             mode=mode, decode=decode, decode_resolution=decode_resolution)
        self.last_guider: Optional[GFCGGuider] = None

    def guider_for(self, outer) -> GFCGGuider:
        """The GFCG guider equivalent to the sampler's guider ``outer`` (a CFGGuider)."""
        conds = outer.original_conds
        cfg = float(getattr(outer, "cfg", 1.0))
        negative = conds.get("negative")
        # GFCG + CFG whenever the sampler has a negative: at cfg = 1 the engine skips it as ComfyUI does
        # (GFCG alone), unless the sampler asks for it (disable_cfg1_optimization, CFG++)
        combine = "cfg" if negative is not None else "none"
        s = self.settings
        g = GFCGGuider(outer.model_patcher, s["config"], s["classifier"], raw_conditioning(conds["positive"]),
                       vae=s["vae"], clip=s["clip"], prompt_template=s["prompt_template"], combine=combine,
                       mode=s["mode"], scale=cfg if combine == "cfg" else 1.0,
                       negative=raw_conditioning(negative) if combine == "cfg" else None,
                       decode=s["decode"], decode_resolution=s["decode_resolution"])
        # the guider's own model clone must not run this wrapper again
        g.model_patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
        return g

    def __call__(self, executor, *args, **kwargs):
        """ComfyUI calls an OUTER_SAMPLE wrapper with its executor and ``CFGGuider.outer_sample``'s
        arguments (read here by name from that signature, so newer arguments are tolerated)."""
        outer = executor.class_obj
        if type(outer) is not comfy.samplers.CFGGuider:
            # another guider samples this model (a GFCG Guider, the gradient guider, Guider_Basic,
            # DualCFG, a pack's own): it keeps its own guidance; the patch is for KSampler's CFG
            return executor(*args, **kwargs)
        a = named_arguments(comfy.samplers.CFGGuider.outer_sample, args, kwargs)
        shapes = a.get("latent_shapes")
        if shapes is not None and len(shapes) > 1:
            raise GFCGInputError(f"GFCG Model Patch: this sampler packs {len(shapes)} latents into one run (e.g. "
                                 "video with audio); the classifier can judge one image latent only")
        g = self.guider_for(outer)
        self.last_guider = g
        # the mask is already what outer_sample takes (see the module docstring): past g.sample, into g's outer_sample
        mask = a["denoise_mask"]
        if mask is not None:
            g.model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                                 GivenMask(mask))
        return g.sample(a["noise"], a["latent_image"], a["sampler"], a["sigmas"], None, a["callback"],
                        a["disable_pbar"], a["seed"])


class GivenMask:
    """A one-run OUTER_SAMPLE wrapper on the GFCG guider's own model clone: hands its ``outer_sample``
    the denoise mask the sampler's guider handed to the patch (``None`` reached it through
    ``GFCGGuider.sample``, which would otherwise prepare that mask a second time)."""

    def __init__(self, mask):
        self.mask = mask

    def __call__(self, executor, *args, **kwargs):
        names = list(inspect.signature(comfy.samplers.CFGGuider.outer_sample).parameters)[1:]   # less self
        i = names.index("denoise_mask")
        if len(args) > i:
            args = args[:i] + (self.mask,) + args[i + 1:]
        else:
            kwargs = {**kwargs, "denoise_mask": self.mask}
        return executor(*args, **kwargs)


def patch_model(model_patcher, wrapper: GFCGSampleWrapper):
    """A clone of ``model_patcher`` that samples with GFCG (any earlier GFCG patch replaced)."""
    m = model_patcher.clone()
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, wrapper)
    return m
