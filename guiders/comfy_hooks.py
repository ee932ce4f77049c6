"""The guider's ComfyUI hooks (imports ComfyUI): the model's pre-/post-CFG functions and CFG hook,
run around GFCG's combination as ComfyUI's own guiders run them, and the progress text on the
executing node."""
from __future__ import annotations

import torch

import comfy.samplers


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
