"""Test setup. ComfyUI integration tests run when a ComfyUI checkout is found (``COMFYUI_PATH``,
``../ComfyUI`` beside the repo, or the repo sitting in ``ComfyUI/custom_nodes``) and skip with the
reason otherwise."""
import asyncio
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The repo root is the pack itself (it has nodes/, __init__.py ...). It must never be on sys.path as
# a plain folder, or its ``nodes`` package would shadow ComfyUI's top-level ``nodes`` module; tests
# import the pack as ``comfyui_gfcg`` (pip install -e .).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]


def find_comfyui():
    cands = [os.environ.get("COMFYUI_PATH"), str(REPO.parent / "ComfyUI"), str(REPO.parents[1])]
    for c in cands:
        if c and (Path(c) / "comfy" / "samplers.py").is_file():
            return Path(c).resolve()
    return None


COMFYUI = find_comfyui()
SKIP_REASON = ("no ComfyUI checkout found: set COMFYUI_PATH or put a Comfy-Org/ComfyUI checkout at "
               f"{REPO.parent / 'ComfyUI'} (its requirements installed in this environment)")

_state = {}


def load_comfy():
    """Import ComfyUI on the CPU and load this pack into its node registry (once per session)."""
    if "nodes" in _state:
        return _state
    if COMFYUI is None:
        pytest.skip(SKIP_REASON)
    if str(COMFYUI) not in sys.path:
        sys.path.insert(0, str(COMFYUI))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (after args.cpu)
    import nodes as comfy_nodes

    if "SamplerCustomAdvanced" not in comfy_nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(comfy_nodes.init_builtin_extra_nodes())
    if "GFCGGuider" not in comfy_nodes.NODE_CLASS_MAPPINGS:
        ok = asyncio.run(comfy_nodes.load_custom_node(str(REPO)))
        assert ok, "ComfyUI failed to load the pack (see the log)"
    _state["nodes"] = comfy_nodes
    return _state


@pytest.fixture(scope="session")
def comfy():
    return load_comfy()
