"""GFCG guidance: the framework-free core (``core``, ``schedule``, ``engine``, ``config``, ``checks``,
``pixels``, ``references``, ``gradient``) and the ComfyUI glue (``comfy_*``, imported only inside
ComfyUI): the guider, its forwards, decoding, hooks, the gradient guider and the model patch."""
from ..common.errors import GFCGInputError
from .config import GFCGConfig
from .core import Decision, decide, gfcg_scale
from .engine import Branch, GFCGEngine, StepResult
from .schedule import GFCGSchedule, step_index

__all__ = ["GFCGConfig", "GFCGInputError", "Decision", "decide", "gfcg_scale", "Branch", "GFCGEngine",
           "StepResult", "GFCGSchedule", "step_index"]
