"""The patcher class for the pack's models (imports ComfyUI)."""
from __future__ import annotations

import comfy.model_patcher


def patcher_class(disable_dynamic: bool = False):
    """The patcher class ComfyUI's own loaders use now: ``CoreModelPatcher`` (the dynamic-VRAM
    patcher where ComfyUI turned DynamicVRAM on, else the plain one; looked up at call time, since
    ComfyUI rebinds it at start-up), or ``ModelPatcher`` on ComfyUI without it (0.3.64) and where a
    caller asks for the non-dynamic delegate (``disable_dynamic``, as in ``comfy.sd``'s loaders)."""
    if disable_dynamic:
        return comfy.model_patcher.ModelPatcher
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
