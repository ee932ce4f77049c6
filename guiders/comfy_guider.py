"""The GFCG GUIDER for ComfyUI's sampler (imports ComfyUI; the math is in ``engine``/``core``).

``GFCGGuider`` is a ``comfy.samplers.CFGGuider`` whose ``predict_noise`` hands each evaluation to
:class:`~.engine.GFCGEngine`. The engine asks for branches; ``comfy_forward`` evaluates them (one
fused forward per model where the conds allow), ``comfy_decode`` shows x0 to the classifier,
``checks`` refuses what cannot work before sampling starts, and ``comfy_hooks`` runs the model's
pre-/post-CFG hooks around the combination, as ComfyUI's guiders do.

The guide model (autoguidance), the VAE and the classifier are attached as additional models, so
ComfyUI loads them together with the main model; the guide model gets its own processed conds.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers

from ..classifiers.comfy_classifier import classify
from ..common.errors import GFCGInputError
from .callconv import call_with_supported, extra_arguments, named_arguments
from .checks import (check_finite_latent, check_guide_model, check_image_latent, check_label_use, check_vae,
                     make_reference, per_row_classes)
from .comfy_decode import PixelDecoder, additional_models, resolve_decode
from .comfy_forward import batched_forward, guide_options, single_device
from .comfy_hooks import comfy_cfg_function, post_cfg_hooks, pre_cfg_hooks, report_trace
from .config import GFCGConfig
from .core import reference_candidates
from .engine import Branch, GFCGEngine
from .references import TextReference

log = logging.getLogger("comfyui_gfcg")


# the arguments of CFGGuider.inner_sample that every supported ComfyUI passes (v0.3.64's list)
_INNER_SAMPLE_ARGS = ("noise", "latent_image", "device", "sampler", "sigmas", "denoise_mask", "callback",
                      "disable_pbar", "seed")


def encode_references(reference: TextReference, classes) -> int:
    """Encode, before sampling, every reference prompt of ``classes`` that the CLIP has not encoded yet
    (ComfyUI loads the text encoder now, not while the diffusion model samples), with a progress bar
    on the executing node; later guiders and runs with the same CLIP reuse them."""
    import comfy.utils

    todo = len(reference.missing(classes))
    if not todo:
        return 0
    log.info("GFCG: encoding %d reference prompts (%r) before sampling; runs with the same CLIP reuse them",
             todo, reference.template)
    bar = comfy.utils.ProgressBar(todo)
    return reference.prepare(classes, progress=lambda done, total: bar.update_absolute(done, total))


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
        decode = resolve_decode(model_patcher.model, vae, decode)
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
        if isinstance(self.reference, TextReference):
            encode_references(self.reference, reference_candidates(
                config.reference_mode, classifier.classifier.num_classes, [config.desired_class],
                config.fixed_reference))
        check_label_use(model_patcher.model, guide_patcher.model if guide_patcher is not None else None,
                        self.reference, combine, mode)
        self.decoder = PixelDecoder(vae, decode, decode_resolution, classifier.classifier.resize_size)
        self.guide_patcher = guide_patcher
        self._warned_nonfinite, self._pixels_finite = False, None
        self.cfg = float(scale) if combine == "cfg" else 1.0
        self.set_conds(positive, negative if combine == "cfg" else None)

    def combined(self, combine: str, mode: str, scale: float, negative=None, guide_patcher=None) -> "GFCGGuider":
        """A new guider with the same GFCG settings stacked on CFG or autoguidance (inputs stay untouched).
        Only a GFCG Guider's own output stacks: the engine combines GFCG with one of none | cfg | atg, so a
        guider that already comes from a Combiner is refused (rebuilding from the recipe would drop its
        first stacking, e.g. the CFG scale and negative, without a word)."""
        if self.engine.combine != "none":
            first = {"cfg": "cfg", "atg": "autoguidance"}.get(self.engine.combine, self.engine.combine)
            raise GFCGInputError(f"gfcg: this guider already comes from a GFCG Combiner ({first}); connect the GFCG "
                                 "Guider itself. One Combiner stacks GFCG on CFG or on autoguidance, not on both "
                                 "(chained Combiners are not supported)")
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
        check_image_latent(latent_image, getattr(self.inner_model, "latent_format", None))
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
        entries, slots, host = [], [], []
        for bi, br in enumerate(branches):
            if br.cond != "reference":
                entries.append((conds[br.cond], br.rows, 1 if br.cond == "negative" else 0))
                slots.append((bi, None))
                host.append(br.host_rows)
                continue
            # one entry per reference class: the decision's groups (known with its one read)
            for k, sel, sel_host in br.groups:
                entries.append((self._reference_cond(which, k), br.rows[sel], 0))
                slots.append((bi, sel))
                host.append([br.host_rows[i] for i in sel_host])
        outs = batched_forward(model, entries, x, t, model_options, host_rows=host)
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
        if not self._warned_nonfinite:   # kept on the device; read only if the decision shows a NaN
            self._pixels_finite = torch.isfinite(pixels).all()
        return classify(self.classifier, pixels)

    def _warn_nonfinite(self) -> None:
        """Once per guider, where the newest decision holds a NaN p_des (those samples count as
        confident and get no guidance): say whether the decode or the classifier made it."""
        if self._warned_nonfinite or not self.engine.trace or \
                all(p == p for p in self.engine.trace[-1].p_des):   # NaN != NaN
            return
        self._warned_nonfinite = True
        if self._pixels_finite is not None and not bool(self._pixels_finite):
            log.warning("decode: the %s decode of the denoised estimate holds NaN or infinite pixels, so the "
                        "classifier cannot judge those samples and GFCG leaves them alone; the decoder may be "
                        "broken (e.g. a half-written TAESD or VAE file) or overflow in fp16: try another decode "
                        "or VAE", self.decoder.method)
        else:
            log.warning("classifier: its output for the denoised estimate holds NaN, so GFCG leaves those samples "
                        "alone; a classifier in half precision may overflow: try weight_dtype fp32 or bf16")

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
        self._warn_nonfinite()
        self._reported = report_trace(self.engine, self.classifier.class_names, self.engine.config.tau,
                                      self._reported)
        return post_cfg_hooks(model_options, res, positive, negative, res.scale, timestep, x, self.inner_model)
