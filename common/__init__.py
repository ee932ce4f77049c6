"""The bottom of the pack's import graph, imported by every other package and importing none of
them: the user-facing error type (``errors``), the model folders that ship inside the pack
(``folders``) and ComfyUI's folder registration (``comfy_folders``, imported only inside ComfyUI)."""
from .errors import GFCGInputError, check_range

__all__ = ["GFCGInputError", "check_range"]
