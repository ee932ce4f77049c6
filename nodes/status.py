"""``GET /gfcg/status``: what the server holds, for people who run long queues (imports ComfyUI).

The models ComfyUI has loaded (class and size, the pack's classifiers among them) and the pack's
own caches (zero-shot heads). The soak test reads it to check that the loaded-model count stays
flat over 100 prompts.
"""
from __future__ import annotations

import logging

log = logging.getLogger("comfyui_gfcg")


def status() -> dict:
    import comfy.model_management as mm

    from ..classifiers import clip_classifier

    models = []
    for lm in mm.current_loaded_models:
        m = lm.model
        if m is None:
            continue
        inner = getattr(m, "model", None)
        models.append({"type": type(inner).__name__ if inner is not None else type(m).__name__,
                       "mb": round(lm.model_memory() / 2 ** 20, 1)})
    return {"loaded_models": models, "loaded_model_count": len(models),
            "zero_shot_heads_cached": len(clip_classifier._HEAD_CACHE)}


def register_routes() -> bool:
    """Add the route to ComfyUI's server (once); False when no server runs (scripts, tests)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    srv = getattr(PromptServer, "instance", None)
    if srv is None or getattr(srv, "_gfcg_status_route", False):
        return False

    @srv.routes.get("/gfcg/status")
    async def gfcg_status(request):
        return web.json_response(status())

    srv._gfcg_status_route = True
    return True
