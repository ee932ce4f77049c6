"""GFCG guidance: the framework-free core (``core``, ``schedule``, ``engine``, ``config``) and the
ComfyUI guider (``comfy_guider``, imported only inside ComfyUI)."""
from .config import GFCGConfig, GFCGInputError
from .core import Decision, decide, gfcg_scale
from .engine import Branch, GFCGEngine, StepResult
from .schedule import GFCGSchedule, step_index

__all__ = ["GFCGConfig", "GFCGInputError", "Decision", "decide", "gfcg_scale", "Branch", "GFCGEngine",
           "StepResult", "GFCGSchedule", "step_index"]
