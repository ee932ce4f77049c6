"""GFCG settings with input checking that names the offending input and what is allowed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..common.errors import GFCGInputError, check_range  # noqa: F401  (re-exported)
from .core import REFERENCE_MODES, SWAP_RULES

CLASSIFY_INPUTS = ("current", "previous")


def check_window(start: float, end: float) -> None:
    check_range("window_start", start, 0.0, 1.0)
    check_range("window_end", end, 0.0, 1.0)
    if not start < end:
        raise GFCGInputError(f"window_start ({start}) must be smaller than window_end ({end}); both are fractions "
                             "in [0, 1] of the model's noise range (0 = the highest noise, 1 = clean), like "
                             "ComfyUI's start/end percent")


def check_period(period) -> int:
    if isinstance(period, bool) or int(period) != period or int(period) < 1:
        raise GFCGInputError(f"period: {period!r} is not allowed; the classifier runs every `period` steps, an integer >= 1")
    return int(period)


@dataclass
class GFCGConfig:
    """Everything that defines a GFCG decision schedule (see the README's parameter advice).

    desired_class:   index of the desired class in the classifier's vocabulary
    tau:             confidence threshold in [0, 1]; p_des >= tau means no guidance (tau = 0: never)
    alpha, beta:     scale omega = 1 + alpha (1 - p_des / tau) ** beta; alpha >= 0, beta > 0
    window_start/end: where the classifier may run, as fractions of the model's noise range (ComfyUI's
                     start/end percent; ``schedule.window_steps``)
    period:          classifier every `period` steps inside the window; decisions reused in between
    reference_mode:  deterministic | stochastic | fixed
    fixed_reference: the class for mode 'fixed'
    classify_input:  current (D1 of this evaluation, paper order) | previous (last guided estimate)
    temperature:     softmax temperature T of the classifier's logits
    swap_rule:       swap mode's scale for a confused sample's swapped branch (``core.swap_scale``)
    settle_after:    a sample confident on this many consecutive classifier steps is not classified
                     again (its decision, no guidance, stands); 0 = classify every sample every time
    """

    desired_class: int
    tau: float = 0.5
    alpha: float = 8.0
    beta: float = 1.0
    window_start: float = 0.0
    window_end: float = 1.0
    period: int = 1
    reference_mode: str = "deterministic"
    fixed_reference: Optional[int] = None
    classify_input: str = "current"
    temperature: float = 1.0
    swap_rule: str = "sum"
    settle_after: int = 0

    def __post_init__(self):
        self.tau = check_range("tau", self.tau, 0.0, 1.0)
        self.alpha = check_range("alpha", self.alpha, 0.0)
        self.beta = check_range("beta", self.beta, 0.0, lo_open=True)
        self.temperature = check_range("temperature", self.temperature, 0.0, lo_open=True)
        check_window(self.window_start, self.window_end)
        self.period = check_period(self.period)
        if self.reference_mode not in REFERENCE_MODES:
            raise GFCGInputError(f"reference_mode: {self.reference_mode!r} is not one of {list(REFERENCE_MODES)}")
        if isinstance(self.settle_after, bool) or not isinstance(self.settle_after, (int, float)) or \
                not float(self.settle_after).is_integer() or self.settle_after < 0:
            raise GFCGInputError(f"settle_after: {self.settle_after!r} must be a whole number >= 0 (0 = off)")
        self.settle_after = int(self.settle_after)
        if self.swap_rule not in SWAP_RULES:
            raise GFCGInputError(f"swap_rule: {self.swap_rule!r} is not one of {list(SWAP_RULES)}")
        if self.classify_input not in CLASSIFY_INPUTS:
            raise GFCGInputError(f"classify_input: {self.classify_input!r} is not one of {list(CLASSIFY_INPUTS)}")
        if int(self.desired_class) < 0:
            raise GFCGInputError(f"desired_class: index {self.desired_class} must be >= 0")
        if self.reference_mode == "fixed":
            if self.fixed_reference is None:
                raise GFCGInputError("fixed_reference: reference_mode 'fixed' needs a class (name or index)")
            if int(self.fixed_reference) == int(self.desired_class):
                raise GFCGInputError(f"fixed_reference: class {self.fixed_reference} is the desired class; "
                                     "guiding away from it would guide away from what you asked for")
