"""The error every package raises for bad user input, and the range check most inputs use."""
from __future__ import annotations

import math


class GFCGInputError(ValueError):
    """A user-facing input error: the message names the input and what is allowed."""


def check_range(name: str, value: float, lo: float = -math.inf, hi: float = math.inf,
                lo_open: bool = False) -> float:
    """``value`` as a float, or a GFCGInputError naming ``name`` and the allowed interval."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise GFCGInputError(f"{name}: expected a number, got {value!r}") from None
    bad = not math.isfinite(v) or v > hi or (v <= lo if lo_open else v < lo)
    if bad:
        left = "(" if lo_open else "["
        raise GFCGInputError(f"{name}: {value!r} is outside the allowed range {left}{lo}, {hi}]")
    return v
