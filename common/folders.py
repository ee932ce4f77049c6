"""Model folders that ship inside the pack, by ComfyUI folder key (framework-free).

The loaders list these next to ComfyUI's own model folders, so the testbed's committed models
show up in the loader nodes. The paths are data (relative to the pack's root): the product knows
where the bundled files lie without importing the testbed's code, and ``testbed.files`` reads its
weight folders from here, so the two cannot drift apart.
"""
from __future__ import annotations

import os
from typing import List

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = {"edm2": ("testbed/weights/edm2",), "gfcg_classifiers": ("testbed/weights/classifiers",)}


def bundled_folders(key: str) -> List[str]:
    """Absolute paths of the pack's own folders for ComfyUI folder ``key`` (none for most keys)."""
    return [os.path.join(PACK_ROOT, *p.split("/")) for p in BUNDLED.get(key, ())]
