"""Off-the-shelf classifier guidance with gradients (EluCD, arXiv 2310.11311), in plain PyTorch.

An ordinary image classifier (not trained on noisy images) guides sampling through the gradient of
its class score, made usable by the paper's pre-conditioning steps:

1. the classifier sees the denoised estimate x0_hat = D(x; sigma), not the noisy x (the gradient is
   taken w.r.t. x0_hat and NOT back-propagated through the denoiser);
2. ``softplus_copy``: every ReLU of the classifier becomes Softplus(beta) at inference (smoother
   gradients; no retraining);
3. ``guidance_objective``: joint / marginal temperatures, tau1 f_y - logsumexp(tau2 f);
4. ``rms_normalise`` and ``guidance_weight``: the official EDM code's per-sample RMS normalisation
   and its linear-decay-plus-sine weight schedule.

``denoised_term`` maps the official update (a displacement of x before each Euler step) onto a term
added to the denoised estimate, so that every ComfyUI sampler can use it (derivation there).
What the official code does is summarised in ``../shared/reference/offshelf-classifier-guidance.md``;
the README ("Off-the-shelf classifier guidance") lists where this implementation chooses.
Nothing here imports ComfyUI.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional

import torch

from ..common.errors import GFCGInputError, check_range
from ..common.grad_copy import plain_resident_copy
from .engine import Branch, Evaluate, StepResult
from .core import cfg as cfg_combine
from .schedule import check_sigmas, step_index, step_starts

CLASSIFIER_INPUTS = ("denoised", "noisy")


# --------------------------------------------------------------------------------------------
# The classifier: ReLU -> Softplus
# --------------------------------------------------------------------------------------------

def softplus_copy(module: torch.nn.Module, beta: float, device=None) -> tuple:
    """(copy, n): a copy of ``module`` in which every ``nn.ReLU`` module (inplace or not) is replaced by
    ``nn.Softplus(beta)``, Softplus_beta(x) = log(1 + exp(beta x)) / beta, and n is the number replaced.

    ``beta = inf`` keeps the ReLUs (Softplus_beta -> ReLU as beta -> inf). The copy is made with
    inference mode off and gradients on, so its weights are ordinary tensors that autograd may save
    (ComfyUI builds models under ``torch.inference_mode()``); the input module is left untouched.
    ReLUs applied as functions (``F.relu`` inside a ``forward``) cannot be replaced; the count tells.
    ``device``: where the copy's weights go (``None``: each where the original's is).
    """
    if not beta > 0:
        raise GFCGInputError(f"softplus_beta: must be > 0 (inf keeps ReLU), got {beta}")
    out = plain_resident_copy(module, device)   # never duplicates ComfyUI's runtime objects (DynamicVRAM)
    n = 0
    if math.isinf(beta):
        return out, n
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.ReLU:
                setattr(parent, name, torch.nn.Softplus(beta=float(beta)))
                n += 1
    return out, n


def grad_ready(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself when autograd may use its weights, else a copy that it may (weights made under
    ``torch.inference_mode()`` cannot be saved for backward)."""
    if any(t.is_inference() for t in list(module.parameters()) + list(module.buffers())):
        with torch.inference_mode(False):
            return copy.deepcopy(module)
    return module


# --------------------------------------------------------------------------------------------
# The formulas
# --------------------------------------------------------------------------------------------

def guidance_objective(logits: torch.Tensor, desired: torch.Tensor, tau1: float, tau2: float) -> torch.Tensor:
    """Per-sample score  J = tau1 * f_y - logsumexp_k(tau2 * f_k)  (EluCD's joint/marginal form).

    tau2 = tau1 gives tau1-tempered log-softmax (ordinary conditional guidance); tau2 = 0 the bare
    logit f_y (pure joint guidance, the official EDM script); 0 < tau2 < tau1 down-weights the
    marginal. logsumexp keeps it finite for large logits (the official code exponentiates).
    """
    f = logits if logits.dtype == torch.float64 else logits.float()
    fy = f.gather(1, desired.view(-1, 1).to(f.device)).squeeze(1)
    return tau1 * fy - torch.logsumexp(tau2 * f, dim=1)


def guidance_gradient(logits_fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, desired: torch.Tensor,
                      tau1: float, tau2: float) -> tuple:
    """(g, logits):  g = d J / d x0 per sample, J from ``guidance_objective``, with x0 a detached leaf
    (no gradient reaches whatever produced x0, e.g. the denoiser).

    Runs with inference mode off and gradients on whatever the caller's mode; the graph is freed
    when this returns. Samples are independent (eval-mode classifier), so d(sum J)/dx0 is each
    sample's own gradient.
    """
    with torch.inference_mode(False), torch.enable_grad():
        leaf = x0.detach().clone().requires_grad_(True)   # clones of inference tensors are ordinary ones
        desired = desired.clone()                          # gather saves the index for backward
        logits = logits_fn(leaf)
        score = guidance_objective(logits, desired, tau1, tau2).sum()
        (g,) = torch.autograd.grad(score, leaf)
    return g.detach(), logits.detach()


def rms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square over all non-batch dims, shaped [B, 1, ..., 1]."""
    return x.float().pow(2).flatten(1).mean(1).sqrt().view(-1, *([1] * (x.ndim - 1)))


def rms_normalise(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """g_hat = g / RMS(g) * RMS(ref)   per sample (the official EDM code, ref = the noisy x).

    A sample whose gradient is exactly 0 gets 0 (the official code would divide by zero).
    """
    r = rms(g)
    return torch.where(r > 0, g.float() / r.clamp_min(1e-30), torch.zeros_like(g, dtype=torch.float32)) * rms(ref)


def guidance_weight(i: int, n: int, s: float, gamma: float) -> float:
    """w_i = s * ( (N + 1 - i) / (N + 1) + gamma * sin(pi i / N) ),  step i = 0 .. N-1 of N.

    A linear decay from s (first step) to 2 s / (N + 1) (last step) plus a sine bump of height
    gamma * s at mid-sampling (the official EDM code: s = max_guidance, gamma = add_factor).
    """
    if n <= 0:
        raise ValueError(f"the schedule needs at least one step, got {n}")
    return s * ((n + 1 - i) / (n + 1) + gamma * math.sin(math.pi * i / n))


def noisy_input(x: torch.Tensor) -> torch.Tensor:
    """The official EDM classifier input: x / RMS(x) where RMS(x) > 1, else x (per sample)."""
    return x / rms(x).clamp_min(1.0).to(x.dtype)


def denoised_term(delta: torch.Tensor, sigma: float, sigma_start: float, sigma_next: float) -> torch.Tensor:
    """Delta = sigma / (sigma_start - sigma_{i+1}) * delta: the displacement ``delta`` of x over step i,
    written as a term on the denoised estimate, D~ = D + Delta.

    ``sigma_start`` is where the sampler starts step i: sigma_i, or sigma_hat_i > sigma_i for a
    churning sampler (``schedule.step_starts``); it steps from there to sigma_{i+1}.

    Derivation. The official EDM code moves x by delta = w_i RMS(x) g_hat before the Euler step of
    step i (sigma_s -> sigma_{i+1}, dt = sigma_{i+1} - sigma_s < 0, sigma_s = sigma_start) and leaves
    D alone; with D following x (D(x + delta) = D(x) + delta, the frame in which delta is a
    displacement of the sample):
        x_{i+1} = x + delta + dt (x - D) / sigma_s.
    A term Delta on D changes the probability-flow slope (x - D) / sigma by -Delta / sigma, so the
    Euler step becomes x + dt (x - D) / sigma_s - dt Delta / sigma_s. Both agree when
        Delta = -sigma_s delta / dt = sigma_s delta / (sigma_s - sigma_{i+1}).
    In the ODE this is the velocity delta / |dt| per unit of sigma, so at any sigma within step i
    (intermediate evaluations) the term is sigma delta / (sigma_s - sigma_{i+1}): a sampler that
    integrates dx/dsigma = (x - D~) / sigma from sigma_s to sigma_{i+1} moves x by delta. Samplers
    that travel another sigma distance per step, or evaluate at step boundaries, scale it: Heun's
    corrector at sigma_{i+1} belongs to step i+1 (``schedule.step_index``) and brings step i+1's
    velocity; ancestral samplers integrate to sigma_down < sigma_{i+1} and move x by
    (sigma_s - sigma_down) / (sigma_s - sigma_{i+1}) delta. The README's gradient-guidance section
    tabulates the per-sampler factor (measured by tests/test_comfy_schedule.py).
    """
    dt = float(sigma_start) - float(sigma_next)
    if not dt > 0:
        raise ValueError(f"step sigmas must decrease, got {sigma_start} -> {sigma_next}")
    return delta * (float(sigma) / dt)


# --------------------------------------------------------------------------------------------
# Config and engine
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CGConfig:
    """Settings of off-the-shelf classifier guidance. Defaults: the official EDM script
    (ImageNet-64, 10 Heun steps): s = 0.004, gamma = 0.3, Softplus beta = 5, tau1 = 1, tau2 = 0."""

    desired_class: int = 0
    scale: float = 0.004              # s: the weight at the first step (official max_guidance)
    gamma: float = 0.3                # sine bump (official add_factor)
    softplus_beta: float = 5.0        # inf: keep the ReLUs
    tau1: float = 1.0                 # joint temperature
    tau2: float = 0.0                 # marginal temperature
    classifier_input: str = "denoised"   # or "noisy" (the official EDM code's choice)
    normalise: bool = True            # per-sample RMS normalisation (else delta = w_i g)

    def __post_init__(self):
        check_range("scale", self.scale, lo=0.0)
        check_range("gamma", self.gamma, lo=0.0)
        check_range("tau1", self.tau1, lo=0.0)
        check_range("tau2", self.tau2, lo=0.0)
        if not self.softplus_beta > 0:
            raise GFCGInputError(f"softplus_beta: must be > 0 (inf keeps ReLU), got {self.softplus_beta}")
        if self.classifier_input not in CLASSIFIER_INPUTS:
            raise GFCGInputError(f"classifier_input: must be one of {', '.join(CLASSIFIER_INPUTS)}, "
                                 f"got {self.classifier_input!r}")
        if isinstance(self.desired_class, bool) or not isinstance(self.desired_class, int) or self.desired_class < 0:
            raise GFCGInputError(f"desired_class: must be a class index >= 0, got {self.desired_class!r}")


@dataclass
class CGTraceEntry:
    step: int
    sigma: float
    p_des: List[float]        # softmax(f)[y] of what the classifier saw
    weight: float             # w_i


@dataclass
class CGEngine:
    """One sampler evaluation -> the guided denoised estimate, D~ = D_base + Delta.

    D_base is D1 (alone), CFG's D_neg + w (D1 - D_neg) (``scale`` w; 1 skips the negative branch),
    both branches in one forward, or autoguidance's G + w (D1 - G) when ``evaluate_guide`` is given
    (the guide model G on the same conditioning, in place of the negative branch). The classifier sees D_base (``classifier_input = "denoised"``;
    with CFG that is the estimate the sampler follows) or the RMS-limited noisy x.
    ``logits_fn`` maps a model-space x0 to logits and must be differentiable (decoder included).
    """

    config: CGConfig
    scale: float = 1.0
    desired_rows: Optional[torch.Tensor] = None
    trace: List[CGTraceEntry] = field(default_factory=list)
    _sigmas: Optional[list] = field(default=None, init=False)
    _starts: Optional[list] = field(default=None, init=False)

    def begin(self, sigmas, sampler_options: Optional[Mapping] = None) -> None:
        """Start a run on ``sigmas`` (refused with a GFCGInputError naming ``sigmas`` unless it decreases);
        ``sampler_options``: the sampler's own options, for a churning sampler's step starts."""
        s = check_sigmas(sigmas)
        if len(s) < 2:
            raise ValueError("the sigma schedule needs at least one step")
        self._sigmas = s
        self._starts = step_starts(s, sampler_options)
        self.trace = []

    @property
    def n_steps(self) -> int:
        return len(self._sigmas) - 1 if self._sigmas else 0

    def _desired(self, b: int, device) -> torch.Tensor:
        if self.desired_rows is not None:
            if self.desired_rows.shape[0] != b:
                raise ValueError(f"desired_rows holds {self.desired_rows.shape[0]} classes for a batch of {b}")
            return self.desired_rows.to(device, torch.long)
        return torch.full((b,), self.config.desired_class, dtype=torch.long, device=device)

    def denoise(self, x: torch.Tensor, sigma: float, evaluate_main: Evaluate,
                logits_fn: Callable[[torch.Tensor], torch.Tensor],
                pre_cfg: Optional[Callable] = None, evaluate_guide: Optional[Evaluate] = None) -> StepResult:
        if self._sigmas is None:
            raise RuntimeError("call begin(sigmas) before denoise")
        c = self.config
        use_neg = self.scale != 1.0
        from_main = use_neg and evaluate_guide is None
        outs = evaluate_main([Branch("positive")] + ([Branch("negative")] if from_main else []))
        d1 = outs[0]
        neg = (outs[1] if from_main else evaluate_guide([Branch("positive")])[0]) if use_neg else d1
        if pre_cfg is not None:
            d1, neg = pre_cfg(d1, neg)
        base = cfg_combine(d1, neg, self.scale) if use_neg else d1
        if c.scale == 0:
            return StepResult(base, d1, neg, self.scale)

        n = len(self._sigmas) - 1
        i = step_index(self._sigmas, float(sigma), self._starts)
        if not self._starts[i] > self._sigmas[i + 1]:
            return StepResult(base, d1, neg, self.scale)   # a step of length 0: no sigma to move x over
        w = guidance_weight(i, n, c.scale, c.gamma)
        x_in = base if c.classifier_input == "denoised" else noisy_input(x)
        desired = self._desired(x.shape[0], x.device)
        g, logits = guidance_gradient(logits_fn, x_in, desired, c.tau1, c.tau2)
        g = g.to(x.device)
        delta = w * (rms_normalise(g, x) if c.normalise else g.float())
        term = denoised_term(delta, float(sigma), self._starts[i], self._sigmas[i + 1])
        p = torch.softmax(logits.float(), dim=1).gather(1, desired.view(-1, 1).to(logits.device)).squeeze(1)
        self.trace.append(CGTraceEntry(i, float(sigma), p.tolist(), w))
        return StepResult(base + term.to(base.dtype), d1, neg, self.scale)
