"""When the classifier runs: a guidance window over the sampler's sigma schedule and a period.

Everything is keyed to the sigma schedule, never to the number of model calls, so a 2nd-order
sampler (Heun, 2 calls per step) makes the same decisions at the same sigmas as Euler.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .core import Decision


def step_index(sigmas: Sequence[float], sigma: float) -> int:
    """The step an evaluation at ``sigma`` belongs to:  i = #{ j < N : sigma_j >= sigma } - 1.

    ``sigmas`` is the sampler's schedule sigma_0 > ... > sigma_N (N steps, usually sigma_N = 0).
    Step i owns the half-open interval (sigma_{i+1}, sigma_i] -- except that an evaluation exactly at
    sigma_{i+1} (Heun's corrector, or the start of step i+1) belongs to step i+1. So every sampler
    that evaluates at the schedule's sigmas reaches step i first at sigma_i, and intermediate sigmas
    (DPM++ 2S, ancestral sub-steps) are reused by the step they fall in.
    """
    n = len(sigmas) - 1
    count = sum(1 for s in sigmas[:n] if s >= sigma * (1 - 1e-6))  # relative tolerance: float32 vs float64 sigmas
    return max(0, min(n - 1, count - 1)) if n > 0 else 0


def in_window(step: int, n_steps: int, start: float, end: float) -> bool:
    """Step i is inside the window iff start <= i / N < end  (fractions of the N-step schedule)."""
    if n_steps <= 0:
        return True
    progress = step / n_steps
    return start <= progress < end


def classifier_steps(n_steps: int, start: float, end: float, period: int) -> List[int]:
    """Steps at which the classifier runs: the window's first step and every ``period``-th after it."""
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    window = [i for i in range(n_steps) if in_window(i, n_steps, start, end)]
    return window[::period]


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
    decided: Dict[int, Decision] = field(default_factory=dict)
    _classify: set = field(default_factory=set)
    _window: set = field(default_factory=set)

    def __post_init__(self):
        if not 0.0 <= self.window_start < self.window_end <= 1.0:
            raise ValueError(f"window must satisfy 0 <= start < end <= 1, got start={self.window_start}, end={self.window_end}")
        if self.period < 1:
            raise ValueError(f"period must be >= 1, got {self.period}")

    def begin(self, sigmas) -> None:
        s = sigmas.detach().float().cpu().tolist() if torch.is_tensor(sigmas) else [float(v) for v in sigmas]
        self.sigmas = s
        self.decided = {}
        n = max(len(s) - 1, 0)
        self._window = {i for i in range(n) if in_window(i, n, self.window_start, self.window_end)}
        self._classify = set(classifier_steps(n, self.window_start, self.window_end, self.period))

    @property
    def n_steps(self) -> int:
        return max(len(self.sigmas) - 1, 0)

    def step_of(self, sigma: float) -> int:
        return step_index(self.sigmas, sigma)

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
