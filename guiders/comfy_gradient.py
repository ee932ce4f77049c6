"""Off-the-shelf classifier guidance (EluCD) as a GUIDER for ComfyUI's sampler (imports ComfyUI;
the math is in ``gradient``).

Each evaluation: the conditional (and, with CFG, the negative) branch in one ComfyUI batch, CFG,
then the classifier's gradient on the decoded estimate, added to the denoised estimate as
``gradient.denoised_term`` derives. ComfyUI executes nodes under ``torch.inference_mode()``:
the gradient is taken with inference mode off, through copies of the classifier (with Softplus)
and of the VAE decoder that are made for the run on the device the models were loaded to, and
dropped when it ends. ComfyUI is asked to make room for them first (``reserve_memory``). The autograd graph lives only inside ``gradient.guidance_gradient``.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

import comfy.model_management
import comfy.samplers

from ..common.errors import GFCGInputError
from ..common.grad_copy import copy_bytes
from .callconv import named_arguments
from .checks import check_finite_latent, check_image_latent, check_vae, per_row_classes
from .comfy_decode import PixelDecoder, additional_models, resolve_decode
from .comfy_hooks import post_cfg_hooks, pre_cfg_hooks, report_trace
from .gradient import CGConfig, CGEngine, softplus_copy


def reserve_memory(nbytes: int, device, run_patchers) -> None:
    """Ask ComfyUI for ``nbytes`` on ``device`` for memory it does not manage (the run's grad-capable
    copies): ``model_management.free_memory`` offloads other models until that much and the inference
    reserve are free, keeping the models of this run (``run_patchers``) loaded; on 0.33+ with the
    rule ``load_models_gpu`` uses (``for_dynamic`` when all of the run's models are dynamic)."""
    mm = comfy.model_management
    keep = [lm for lm in mm.current_loaded_models if any(lm.model is p for p in run_patchers)]
    kw = {}
    if "for_dynamic" in inspect.signature(mm.free_memory).parameters:
        kw["for_dynamic"] = all(getattr(p, "is_dynamic", lambda: False)() for p in run_patchers)
    mm.free_memory(int(nbytes) + mm.minimum_inference_memory(), torch.device(device), keep_loaded=keep, **kw)


class ClassifierGuidanceGuider(comfy.samplers.CFGGuider):
    """Gradient classifier guidance on D1, or on CFG (``cfg`` != 1 with a negative)."""

    def __init__(self, model_patcher, config: CGConfig, classifier, positive, negative=None, cfg: float = 1.0,
                 vae=None, decode: str = "vae", decode_resolution: float = 1.0):
        num = classifier.classifier.num_classes
        if not 0 <= config.desired_class < num:
            raise GFCGInputError(f"desired_class: index {config.desired_class} is out of range for {num} classes")
        if cfg != 1.0 and negative is None:
            raise GFCGInputError("negative: cfg != 1 needs the negative conditioning (or set cfg to 1)")
        check_vae(model_patcher.model, vae)
        decode = resolve_decode(model_patcher.model, vae, decode)
        mp = model_patcher.clone()
        mp.set_additional_models("gfcg_cg", additional_models(classifier, vae, decode))
        super().__init__(mp)
        self.config = config
        self.classifier = classifier
        self.decoder = PixelDecoder(vae, decode, decode_resolution, classifier.classifier.resize_size)
        self.engine = CGEngine(config, scale=float(cfg))
        self._grad_classifier: Optional[torch.nn.Module] = None
        conds = {"positive": positive}
        if cfg != 1.0:
            conds["negative"] = negative
        self.inner_set_conds(conds)
        self.cfg = float(cfg)
        self._positive = positive

    def inner_sample(self, *args, **kwargs):
        """Grad-capable copies for the run, then ComfyUI's own ``inner_sample`` with the arguments as
        given (read by name from the parent's signature; newer arguments pass through)."""
        a = named_arguments(comfy.samplers.CFGGuider.inner_sample, args, kwargs)
        sigmas = a["sigmas"]
        check_finite_latent(a["latent_image"])
        check_image_latent(a["latent_image"], getattr(self.inner_model, "latent_format", None))
        rows = per_row_classes(self._positive, int(a["noise"].shape[0]))
        num = self.classifier.classifier.num_classes
        if rows is not None and int(rows.max()) >= num:
            raise GFCGInputError(f"positive: per-image class {int(rows.max())} is out of range for the classifier's "
                                 f"{num} classes")
        self.engine.desired_rows = rows
        self.engine.begin(sigmas, sampler_options=getattr(a["sampler"], "extra_options", None))  # may refuse
        # the models are loaded by now: grad-capable copies live on their load devices for this run,
        # in memory that ComfyUI was asked to make room for (other models give way, this run's stay)
        dev = self.classifier.patcher.load_device
        run = [self.model_patcher, *getattr(self, "loaded_models", [])]
        reserve_memory(copy_bytes(self.classifier.classifier), dev, run)
        decoder_bytes = self.decoder.gradient_bytes()
        if decoder_bytes:
            reserve_memory(decoder_bytes, self.decoder.vae.device, run)
        self._grad_classifier, _ = softplus_copy(self.classifier.classifier, self.config.softplus_beta, dev)
        self.decoder.prepare_gradients()
        self._reported = 0
        try:
            return super().inner_sample(*args, **kwargs)
        finally:
            self._grad_classifier = None
            self.decoder.release()

    def _logits(self, x0: torch.Tensor) -> torch.Tensor:
        pixels = self.decoder(self.inner_model, x0)
        dev = self.classifier.patcher.load_device      # not the first weight's: a partial load may split it
        return self._grad_classifier(pixels if pixels.device == dev else pixels.to(dev))

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive, negative = self.conds.get("positive"), self.conds.get("negative")

        def main(branches):
            conds = [positive if b.cond == "positive" else negative for b in branches]
            return comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)

        pre_cfg = pre_cfg_hooks(model_options, positive, negative, self.cfg, timestep, x, self.inner_model)
        res = self.engine.denoise(x, float(timestep.flatten()[0]), main, self._logits, pre_cfg)
        self._reported = report_trace(self.engine, self.classifier.class_names, 0.0, self._reported)
        return post_cfg_hooks(model_options, res, positive, negative, self.cfg, timestep, x, self.inner_model)
