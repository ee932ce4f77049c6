"""Host synchronisations per sampling step on a CUDA device, per row of ``bench --perf --latent``.

torch's sync debug mode (``torch.cuda.set_sync_debug_mode("warn")``) warns on every operation that
makes the host wait for the GPU (``.item()``, ``bool(tensor)``, a copy to the CPU, ``nonzero``...).
The warnings are counted per row and grouped by the Python line that caused them, with the line's
owner (the pack, ComfyUI, torch), so a row's extra syncs over ATG's can be read off and traced. Run
on a GPU machine only (on the CPU there is nothing to count): ``run(LatentPerfConfig(...))``.
"""
from __future__ import annotations

import collections
import os
import warnings
from typing import Dict

import torch

from .perf_latent import ROWS, LatentPerfConfig, build, restore_folders, run_row

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def owner(filename: str) -> str:
    """'pack' | 'comfyui' | 'torch' | 'other' for a source file."""
    path = os.path.abspath(filename)
    if path.startswith(PACK_ROOT + os.sep):
        return "pack"
    if f"{os.sep}torch{os.sep}" in path:
        return "torch"
    if f"{os.sep}comfy" in path:
        return "comfyui"
    return "other"


def count_row(env, label: str, cfg: LatentPerfConfig) -> Dict:
    """One sampling run of ``label`` with the sync debug mode on: syncs in all, per step, by owner,
    and the ten lines that synchronised most (``file:line`` -> count)."""
    lines: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            r = run_row(env, label, cfg)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            lines[(w.filename, w.lineno)] += 1
    by_owner: collections.Counter = collections.Counter()
    for (f, _), n in lines.items():
        by_owner[owner(f)] += n
    total = sum(lines.values())
    return {"row": label, "syncs": total, "syncs_per_step": total / cfg.steps, "by_owner": dict(by_owner),
            "top": {f"{os.path.relpath(f, PACK_ROOT) if owner(f) == 'pack' else os.path.basename(f)}:{ln}": n
                    for (f, ln), n in lines.most_common(10)},
            "nfe": r["nfe"], "classifier_rows_per_image": r["classifier_rows_per_image"]}


def run(cfg: LatentPerfConfig, progress=print) -> Dict:
    """Every row of the latent perf table once (after a one-step warm-up), sync-counted."""
    if not torch.cuda.is_available():
        raise RuntimeError("perf_syncs counts CUDA host synchronisations; this machine has no CUDA device")
    env = build(cfg)
    rows = []
    try:
        for label, _, _ in ROWS:
            run_row(env, label, LatentPerfConfig(**{**cfg.__dict__, "batch": 1, "steps": 1}))
            row = count_row(env, label, cfg)
            rows.append(row)
            progress(f"syncs {label:<48} {row['syncs']:5d} ({row['syncs_per_step']:.1f}/step) {row['by_owner']}")
    finally:
        restore_folders(env)
    return {"config": cfg.__dict__, "rows": rows}
