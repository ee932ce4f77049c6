"""The pinned node API: ComfyUI's V3 schema at version 0.0.2 (falls back to ``latest`` where a
ComfyUI no longer ships that alias), and the pack's own socket types."""
try:
    from comfy_api.v0_0_2 import ComfyExtension, io
except ImportError:  # pragma: no cover - only on ComfyUI builds without the versioned alias
    from comfy_api.latest import ComfyExtension, io

ClassifierType = io.Custom("CLASSIFIER")

__all__ = ["ComfyExtension", "io", "ClassifierType"]
