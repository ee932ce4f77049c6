"""When the classifier runs: a guidance window over the model's sigma range and a period; and which
step of the sampler's schedule an evaluation belongs to.

Everything is keyed to sigma, never to the number of model calls, so a 2nd-order sampler (Heun,
2 calls per step) makes the same decisions at the same sigmas as Euler; and the window is keyed to
the model's own sigma range (ComfyUI's start/end percent), not to the slice of the schedule one
sampler pass receives, so splitting a run into passes (KSamplerAdvanced 0-4, then 4-8) guides the
same steps as one pass. Nothing here imports ComfyUI: the ComfyUI guider hands in the model's
``percent_to_sigma``, the headless sampler its own (``edm_percent_to_sigma``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..common.errors import GFCGInputError
from .core import Decision

PercentToSigma = Callable[[float], float]

# An evaluation within the lowest TIE_FRACTION of a step's log-sigma span above sigma_{i+1} counts
# as AT sigma_{i+1} (see ``step_index``). Samplers that land on sigma_{i+1} in exact arithmetic
# (Heun's corrector, the midpoint of DPM++ 2S / DPM2 ancestral at eta 1) miss it by float32
# round-off -- up to ~10 % of sigma for the ancestral midpoint at step ratios of ~1000, where
# sigma_down cancels -- while genuine intermediate sigmas sit far inside the step (DPM2, DPM++ SDE:
# at half of the log span).
TIE_FRACTION = 0.05
# a churned start sigma_hat_i is matched to within this relative round-off (one float32 product)
CHURN_MATCH = 1e-4


def check_sigmas(sigmas) -> List[float]:
    """The schedule as floats, or a GFCGInputError naming ``sigmas`` when it is not a decreasing
    noise schedule sigma_0 >= sigma_1 >= ... >= sigma_N >= 0 (equal neighbours are allowed: such a
    step has no length and owns no evaluation). Guidance is defined from noise to clean: a reversed
    schedule (FlipSigmas, for inversion) goes the other way and is refused."""
    s = sigmas.detach().double().cpu().flatten().tolist() if torch.is_tensor(sigmas) else [float(v) for v in sigmas]
    for i, v in enumerate(s):
        if not (math.isfinite(v) and v >= 0):
            raise GFCGInputError(f"sigmas: every sigma must be a finite number >= 0, got {v} at position {i}")
    for i in range(len(s) - 1):
        if s[i + 1] > s[i]:
            raise GFCGInputError(
                f"sigmas: guidance needs a schedule that decreases from noise to clean (sigma_0 >= sigma_1 >= ... "
                f">= sigma_N); this one increases at step {i}: {s[i]:.6g} -> {s[i + 1]:.6g}. Reversed schedules "
                "(FlipSigmas, inversion) are not supported: sample with the schedule the scheduler gives")
    return s


# --------------------------------------------------------------------------------------------
# The window: fractions of the model's sigma range
# --------------------------------------------------------------------------------------------

def edm_percent_to_sigma(percent: float, sigma_min: float, sigma_max: float) -> float:
    """sigma(p) = exp( ln sigma_min + (1 - p) (ln sigma_max - ln sigma_min) ) = sigma_max^(1-p) sigma_min^p
    for 0 < p < 1;  sigma(p) = inf for p <= 0 (everything is after the start), 0 for p >= 1.

    The pack's own statement of ComfyUI's ``ModelSamplingContinuousEDM.percent_to_sigma`` (log-linear
    between the model's sigma_min and sigma_max; ComfyUI returns 999999999.9 at p <= 0, which bounds
    nothing either), for the headless sampler, whose EDM2 testbed models ComfyUI loads with that class.
    """
    p = float(percent)
    if p <= 0.0:
        return math.inf
    if p >= 1.0:
        return 0.0
    lo = math.log(sigma_min)
    return math.exp((math.log(sigma_max) - lo) * (1.0 - p) + lo)


def window_sigmas(start: float, end: float, percent_to_sigma: PercentToSigma) -> Tuple[float, float]:
    """(sigma_hi, sigma_lo) = (sigma(start), sigma(end)) of the model's percent -> sigma map, with
    start <= 0 -> +inf and end >= 1 -> -inf, so that the full window (0, 1) holds every step
    whatever the model's range or the schedule (custom sigmas above sigma_max included)."""
    hi = math.inf if start <= 0.0 else float(percent_to_sigma(float(start)))
    lo = -math.inf if end >= 1.0 else float(percent_to_sigma(float(end)))
    return hi, lo


def in_sigma_window(sigma: float, hi: float, lo: float) -> bool:
    """Step i is inside iff  sigma(end) < sigma_i <= sigma(start)  (sigma_i: the step's schedule sigma).

    The same half-open form as before in fractions, start <= p_i < end: the start (high noise)
    edge is included, the end edge is not, so windows (0, a) and (a, 1) split the steps between
    them. (ComfyUI's conditioning ranges include both edges; only a step exactly at sigma(end)
    differs.)"""
    return lo < sigma <= hi


def in_window(step: int, n_steps: int, start: float, end: float) -> bool:
    """Without a model range: step i is inside iff start <= i / N < end (fractions of the N steps given)."""
    if n_steps <= 0:
        return True
    progress = step / n_steps
    return start <= progress < end


def window_steps(sigmas: Sequence[float], start: float, end: float,
                 percent_to_sigma: Optional[PercentToSigma] = None) -> List[int]:
    """The steps of ``sigmas`` inside the window: by sigma (``in_sigma_window``) when the model's
    ``percent_to_sigma`` is known, else as fractions of the steps given (``in_window``)."""
    n = max(len(sigmas) - 1, 0)
    if percent_to_sigma is None:
        return [i for i in range(n) if in_window(i, n, start, end)]
    hi, lo = window_sigmas(start, end, percent_to_sigma)
    return [i for i in range(n) if in_sigma_window(float(sigmas[i]), hi, lo)]


def classifier_steps(n_steps: int, start: float, end: float, period: int,
                     window: Optional[Sequence[int]] = None) -> List[int]:
    """Steps at which the classifier runs: the window's first step and every ``period``-th after it.

    ``window``: the window's steps (``window_steps``); default: the fractions of ``n_steps``. The
    count starts at the first window step of the schedule the guider receives: a run split into
    passes restarts it in each pass (with period 1, the default, nothing changes)."""
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    if window is None:
        window = [i for i in range(n_steps) if in_window(i, n_steps, start, end)]
    return list(window)[::period]


# --------------------------------------------------------------------------------------------
# The step of an evaluation
# --------------------------------------------------------------------------------------------

def churned_starts(sigmas: Sequence[float], s_churn: float = 0.0, s_tmin: float = 0.0,
                   s_tmax: float = math.inf) -> List[float]:
    """sigma_hat_i = sigma_i (1 + gamma_i),  gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax, else 0.

    Where a churning sampler starts step i (Karras et al. 2022, Algorithm 2; k-diffusion's
    ``sample_euler`` / ``sample_heun`` / ``sample_dpm_2`` with ``s_churn`` > 0): it adds noise to
    raise sigma_i to sigma_hat_i, evaluates there, and steps to sigma_{i+1}. N = len(sigmas) - 1."""
    n = len(sigmas) - 1
    out = []
    for i in range(n):
        s = float(sigmas[i])
        gamma = min(float(s_churn) / n, 2 ** 0.5 - 1) if (s_churn > 0 and s_tmin <= s <= s_tmax) else 0.0
        out.append(s * (gamma + 1.0) if gamma > 0 else s)
    return out


def step_starts(sigmas: Sequence[float], sampler_options: Optional[Mapping] = None) -> List[float]:
    """The sigma at which the sampler starts each step: sigma_i, or sigma_hat_i (``churned_starts``)
    when the sampler's own options (ComfyUI: ``KSAMPLER.extra_options``) set ``s_churn`` > 0; only
    the churn options ``s_churn``, ``s_tmin``, ``s_tmax`` are read."""
    o = dict(sampler_options or {})
    churn = float(o.get("s_churn", 0.0) or 0.0)
    if churn <= 0:
        return [float(v) for v in sigmas[:-1]]
    return churned_starts(sigmas, churn, float(o.get("s_tmin", 0.0)), float(o.get("s_tmax", math.inf)))


def step_index(sigmas: Sequence[float], sigma: float, starts: Optional[Sequence[float]] = None) -> int:
    """The step an evaluation at ``sigma`` belongs to, for the schedule sigma_0 >= ... >= sigma_N.

    1. A churned start: sigma = sigma_hat_j (within ``CHURN_MATCH``, ``starts`` from ``step_starts``)
       -> step j. (It lies above sigma_j, inside step j-1's interval, and would otherwise be taken
       for an intermediate of step j-1.)
    2. Otherwise step i owns the interval (sigma_{i+1}, sigma_i]:  i = #{ j < N : sigma_j >= sigma } - 1,
       clamped to 0 .. N-1 (above sigma_0: step 0) -- so intermediate sigmas (DPM2's midpoint,
       DPM++ SDE) reuse the step they fall in --
    3. except at sigma_{i+1} itself, which belongs to step i+1: an evaluation with
           ln(sigma / sigma_{i+1}) <= TIE_FRACTION * ln(sigma_i / sigma_{i+1})
       counts as at sigma_{i+1}, so float32 / float64 round-off never decides. Heun's corrector and
       the eta-1 midpoint of DPM++ 2S / DPM2 ancestral (exactly sigma_{i+1} in exact arithmetic)
       therefore belong to step i+1, and every sampler reaches step i first at sigma_i.
    Equal neighbours (a step of length 0) own no evaluation.
    """
    n = len(sigmas) - 1
    if n <= 0:
        return 0
    sigma = float(sigma)
    if starts is not None:
        for j in range(n):
            hat, s = float(starts[j]), float(sigmas[j])
            if hat > s and abs(sigma - hat) <= CHURN_MATCH * hat:
                return j
    i = max(0, min(n - 1, sum(1 for s in sigmas[:n] if float(s) >= sigma) - 1))
    if i + 1 < n:
        a, b = float(sigmas[i]), float(sigmas[i + 1])
        if b > 0 and b < sigma <= a and math.log(sigma / b) <= TIE_FRACTION * math.log(a / b):
            i += 1
    return i


# --------------------------------------------------------------------------------------------
# Per-run state
# --------------------------------------------------------------------------------------------

@dataclass
class GFCGSchedule:
    """Per-run state: which steps classify, and each step's decision (reused until the next one).

    ``begin`` is called at the start of every sampling run; ``lookup`` tells, for an evaluation at
    sigma, the step index, whether a new decision must be made there, and the decision in force.
    """

    window_start: float = 0.0
    window_end: float = 1.0
    period: int = 1
    sigmas: List[float] = field(default_factory=list)
    starts: List[float] = field(default_factory=list)
    decided: Dict[int, Decision] = field(default_factory=dict)
    _classify: set = field(default_factory=set)
    _window: set = field(default_factory=set)

    def __post_init__(self):
        if not 0.0 <= self.window_start < self.window_end <= 1.0:
            raise ValueError(f"window must satisfy 0 <= start < end <= 1, got start={self.window_start}, end={self.window_end}")
        if self.period < 1:
            raise ValueError(f"period must be >= 1, got {self.period}")

    def begin(self, sigmas, percent_to_sigma: Optional[PercentToSigma] = None,
              sampler_options: Optional[Mapping] = None) -> None:
        """Start a run on ``sigmas`` (the schedule this sampler pass receives).

        ``percent_to_sigma``: the model's fraction -> sigma map (ComfyUI: ``model_sampling.percent_to_sigma``);
        the window is then a range of sigma, the same for every slice of the model's schedule.
        Without it the window is a fraction of the steps given. ``sampler_options``: the sampler's
        options, for churn (``step_starts``)."""
        s = check_sigmas(sigmas)
        self.sigmas = s
        self.starts = step_starts(s, sampler_options)
        self.decided = {}
        window = window_steps(s, self.window_start, self.window_end, percent_to_sigma)
        self._window = set(window)
        self._classify = set(classifier_steps(len(s) - 1, self.window_start, self.window_end, self.period, window))

    @property
    def n_steps(self) -> int:
        return max(len(self.sigmas) - 1, 0)

    def step_of(self, sigma: float) -> int:
        return step_index(self.sigmas, sigma, self.starts)

    def must_classify(self, step: int) -> bool:
        """True the first time an evaluation reaches a classifier step of this run."""
        return step in self._classify and step not in self.decided

    def in_window(self, step: int) -> bool:
        return step in self._window

    def record(self, step: int, decision: Decision) -> None:
        self.decided[step] = decision

    def current(self, step: int) -> Optional[Decision]:
        """The decision in force at ``step``: the latest one made at or before it, inside the window."""
        if step not in self._window:
            return None
        earlier = [i for i in self.decided if i <= step]
        return self.decided[max(earlier)] if earlier else None
