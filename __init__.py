"""comfyui-gfcg: Gradient-Free Classifier Guidance (arXiv 2411.15393) for ComfyUI.

ComfyUI loads this folder from ``custom_nodes/`` and calls ``comfy_entrypoint``; the node modules
(which import ComfyUI) are imported only then, so ``import comfyui_gfcg`` works without ComfyUI.
"""
__version__ = "0.1.0"
WEB_DIRECTORY = "./web"   # web/docs/<node id>.md: the help pages of the node documentation panel


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the pack's extension with its node list."""
    from .nodes.status import register_routes
    from .nodes import GFCGExtension

    register_routes()   # GET /gfcg/status (when a server runs)
    return GFCGExtension()
