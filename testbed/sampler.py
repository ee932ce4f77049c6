"""Headless sampling for the testbed: EDM's Heun sampler on the EDM2 sigma schedule, driving the
SAME ``GFCGEngine`` that the ComfyUI guider uses (no second implementation of any guidance).

Models: class-label EDM2 denoisers (``edm2.EDM2``). The main model was trained with label dropout,
so its zero-label mode is its unconditional branch (the CFG negative). The engine's branch
requests of one model are batched into one forward.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..classifiers.timm_classifier import straight_through_clamp
from ..guiders.config import GFCGConfig
from ..guiders.engine import Branch, GFCGEngine
from ..guiders.gradient import CGConfig, CGEngine
from ..guiders.schedule import edm_percent_to_sigma
from .toy import edm_sigmas

# the testbed models' sigma range (EDM2's; ComfyUI loads them with ModelSamplingContinuousEDM on
# the same range, edm2.comfy_model.SAMPLING): the guidance window is a range of it
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def percent_to_sigma(percent: float) -> float:
    """The testbed models' fraction -> sigma map, ``edm_percent_to_sigma`` on SIGMA_MIN .. SIGMA_MAX
    (what ComfyUI's model_sampling gives the same models), so that the window makes the same
    decisions here and in ComfyUI."""
    return edm_percent_to_sigma(percent, SIGMA_MIN, SIGMA_MAX)

# method -> (combine, uses GFCG)
METHODS = {"none": ("none", False), "cfg": ("cfg", False), "atg": ("atg", False),
           "gfcg": ("none", True), "gfcg+cfg": ("cfg", True), "gfcg+atg": ("atg", True)}
# off-the-shelf gradient classifier guidance (EluCD), alone or on CFG or autoguidance
CG_METHODS = {"cg": "none", "cg+cfg": "cfg", "cg+atg": "atg"}


def straight_through_unit(x0: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] images, clamped in value but with the gradient of the unclamped map, i.e.
    d/dx0 as if x0 had been clipped to [-1, 1] first (the official DDPM code clips x0, then takes
    the gradient with respect to the clipped x0)."""
    return straight_through_clamp((x0 + 1) / 2)


def branch_forward(net, x: torch.Tensor, sigma: float, branches: Sequence[Branch], desired: torch.Tensor,
                   num_classes: int) -> List[torch.Tensor]:
    """All requested branches of one model in ONE forward: rows of x with their class labels
    (positive = each row's desired class [B], negative = zero label, reference = each row's
    reference class)."""
    xs, labels, sizes = [], [], []
    for b in branches:
        xb = x if b.rows is None else x[b.rows]
        n = xb.shape[0]
        if b.cond == "positive":
            lab = F.one_hot(desired if b.rows is None else desired[b.rows], num_classes).float()
        elif b.cond == "negative":
            lab = torch.zeros(n, num_classes, device=x.device)
        else:
            lab = F.one_hot(b.classes.to(x.device), num_classes).float()
        xs.append(xb)
        labels.append(lab)
        sizes.append(n)
    out = net(torch.cat(xs), sigma, torch.cat(labels))
    return list(out.split(sizes))


@dataclass
class SampleResult:
    images: torch.Tensor                 # [N, C, H, W] in the model's pixel space ([-1, 1])
    nfe: float                           # denoiser evaluations per image (all models, all branches)
    trace: list = field(default_factory=list)


@torch.no_grad()
def sample(main, classifier: Callable[[torch.Tensor], torch.Tensor], method: str, desired, n: int,
           seed: int = 0, steps: int = 32, guide=None, cfg_scale: float = 2.0, atg_scale: float = 2.0,
           gfcg: Optional[GFCGConfig] = None, mode: str = "additive", num_classes: int = 10,
           shape=None, progress: Optional[Callable[[int], None]] = None,
           sigmas: Optional[torch.Tensor] = None, cg: Optional[CGConfig] = None) -> SampleResult:
    """Heun (2nd order, Euler on the last step) from sigma_max = 80 to 0 on EDM2's rho = 7 schedule.

    ``sigmas`` (optional) replaces the schedule (then ``steps`` = len(sigmas) - 1), e.g. ComfyUI's
    own float32 karras sigmas for a bit-level comparison.
    ``desired``: one class for all rows, or a sequence / tensor of ``n`` classes (one per row).
    ``classifier`` maps images in [0, 1] to logits; the engine sees x0 through it. Noise: one
    ``torch.randn`` of [n, *shape] (default: the main model's C, H, W) from ``torch.Generator().manual_seed(seed)``, times sigma_0.
    Methods ``cg`` / ``cg+cfg`` / ``cg+atg``: off-the-shelf gradient guidance with ``cg`` (a ``CGConfig``); then
    ``classifier`` must be differentiable (e.g. the Softplus copy of the guidance classifier).
    """
    if shape is None:   # the main model's own image size (through a counting wrapper: its ``fn``)
        c = getattr(main, "config", None) or getattr(getattr(main, "fn", None), "config")
        shape = (c.img_channels, c.img_resolution, c.img_resolution)
    rows = torch.as_tensor(desired, dtype=torch.long).flatten()
    rows = rows.expand(n).clone() if rows.numel() == 1 else rows
    if rows.shape[0] != n or int(rows.min()) < 0 or int(rows.max()) >= num_classes:
        raise ValueError(f"desired: expected one class or {n} classes in 0..{num_classes - 1}, got {desired!r}")
    if method not in METHODS and method not in CG_METHODS:
        raise ValueError(f"method must be one of {list(METHODS) + list(CG_METHODS)}, got {method!r}")
    if method in CG_METHODS:
        base = CG_METHODS[method]
        if base == "atg" and guide is None:
            raise ValueError("method uses autoguidance but no guide model was given")
        return _sample_cg(main, classifier, method, rows, n, seed, steps,
                          {"cfg": cfg_scale, "atg": atg_scale}.get(base, 1.0), cg or CGConfig(), num_classes,
                          shape, progress, sigmas, guide if base == "atg" else None)
    combine, use_gfcg = METHODS[method]
    if combine == "atg" and guide is None:
        raise ValueError("method uses autoguidance but no guide model was given")
    cfg = gfcg if gfcg is not None else GFCGConfig(desired_class=0)
    cfg = dataclasses.replace(cfg, desired_class=int(rows[0]), tau=cfg.tau if use_gfcg else 0.0)
    scale = {"cfg": cfg_scale, "atg": atg_scale}.get(combine, 1.0)
    engine = GFCGEngine(cfg, combine=combine, mode=mode, scale=scale, desired_rows=rows)
    sigmas = edm_sigmas(steps) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32)
    steps = len(sigmas) - 1
    engine.begin(sigmas, seed, percent_to_sigma=percent_to_sigma)
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n, *shape, generator=g) * float(sigmas[0])
    evals = 0

    def classify(x0):
        return classifier(((x0 + 1) / 2).clamp(0, 1))

    def denoise(xc, s):
        def main_eval(branches):
            nonlocal evals
            evals += sum(xc.shape[0] if b.rows is None else int(b.rows.numel()) for b in branches)
            return branch_forward(main, xc, s, branches, rows, num_classes)

        def guide_eval(branches):
            nonlocal evals
            evals += sum(xc.shape[0] if b.rows is None else int(b.rows.numel()) for b in branches)
            return branch_forward(guide, xc, s, branches, rows, num_classes)

        return engine.denoise(xc, s, main_eval, classify, guide_eval if combine == "atg" else None).denoised

    x = heun(x, sigmas, denoise, progress)
    return SampleResult(x, evals / n, engine.trace)


def heun(x: torch.Tensor, sigmas: torch.Tensor, denoise, progress=None) -> torch.Tensor:
    """EDM's Heun sampler over ``sigmas`` with ``denoise(x, sigma)``."""
    for i in range(len(sigmas) - 1):
        # Heun: slope dx/dsigma = (x - D) / sigma at both ends, averaged; Euler onto sigma = 0.
        # (float32 sigmas and step dt, in this order of operations, like k-diffusion's sampler.)
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        dt = float(sigmas[i + 1] - sigmas[i])
        slope = (x - denoise(x, s)) / s
        x_euler = x + slope * dt
        if s_next > 0:
            slope2 = (x_euler - denoise(x_euler, s_next)) / s_next
            x = x + (slope + slope2) / 2 * dt
        else:
            x = x_euler
        if progress is not None:
            progress(i)
    return x


def _sample_cg(main, classifier, method, rows, n, seed, steps, scale, cg: CGConfig, num_classes, shape,
               progress, sigmas, guide=None) -> SampleResult:
    """``sample`` for the gradient methods: the CG engine on the same noise, sampler and models
    (``scale``: CFG's or autoguidance's w; ``guide``: the autoguidance model, or None)."""
    engine = CGEngine(cg, scale=scale, desired_rows=rows)
    sigmas = edm_sigmas(steps) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32)
    engine.begin(sigmas)
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n, *shape, generator=g) * float(sigmas[0])
    evals = 0

    def logits(x0):
        return classifier(straight_through_unit(x0))

    def denoise(xc, s):
        def main_eval(branches):
            nonlocal evals
            evals += xc.shape[0] * len(branches)
            return branch_forward(main, xc, s, branches, rows, num_classes)

        def guide_eval(branches):
            nonlocal evals
            evals += xc.shape[0] * len(branches)
            return branch_forward(guide, xc, s, branches, rows, num_classes)

        return engine.denoise(xc, s, main_eval, logits,
                              evaluate_guide=guide_eval if guide is not None else None).denoised

    x = heun(x, sigmas, denoise, progress)
    return SampleResult(x, evals / n, engine.trace)
