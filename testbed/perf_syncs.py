"""Host synchronisations per sampling step, per row of ``bench --perf --latent``.

On a CUDA device torch's sync debug mode (``torch.cuda.set_sync_debug_mode("warn")``) warns on every
operation that makes the host wait for the GPU; elsewhere (the CPU, CI) :class:`.host_reads.HostReads`
counts the operations that would (``--host-reads``). Either way the count is per row and grouped by the
Python line that caused it, with the line's owner (the pack, ComfyUI, torch), so a row's extra
synchronisations over ATG's can be read off and traced. The count does not depend on the networks'
size, so on the CPU the setting's EDM2 networks may be the tiny ones (``main = guide = "tiny"``).

The CPU count sees host reads and tensors made from Python data (uploads), not copies between two
devices (``.to(device)``), which a CPU-only run cannot tell apart from no-ops.
"""
from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Dict

import torch

from .host_reads import HostReads, by_owner, top_lines
from .perf_latent import ROWS, LatentPerfConfig, build, close, run_row


def _cuda_count(env, label: str, cfg: LatentPerfConfig) -> Dict:
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
    return {"r": r, "lines": lines, "uploads": None}


def _cpu_count(env, label: str, cfg: LatentPerfConfig) -> Dict:
    with HostReads() as h:
        r = run_row(env, label, cfg)
    return {"r": r, "lines": h.lines, "uploads": h.uploads}


def count_row(env, label: str, cfg: LatentPerfConfig) -> Dict:
    """One sampling run of ``label``, its synchronisations counted (on CUDA where the models are there,
    else on the CPU): in all, per step, by owner, and the ten lines that synchronised most (``file:line``
    -> count); on the CPU also the uploads, apart."""
    cuda = torch.cuda.is_available() and env["main"].load_device.type == "cuda"
    got = (_cuda_count if cuda else _cpu_count)(env, label, cfg)
    lines, r = got["lines"], got["r"]
    total = sum(lines.values())
    row = {"row": label, "counted": "cuda sync debug mode" if cuda else "cpu host reads", "syncs": total,
           "syncs_per_step": total / cfg.steps, "by_owner": by_owner(lines), "top": top_lines(lines, 10),
           "nfe": r["nfe"], "classifier_rows_per_image": r["classifier_rows_per_image"]}
    if got["uploads"] is not None:
        row.update(uploads=sum(got["uploads"].values()), top_uploads=top_lines(got["uploads"], 5))
    return row


def run(cfg: LatentPerfConfig, progress=print) -> Dict:
    """Every row of the latent perf table once (after a one-step warm-up), its synchronisations counted."""
    env = build(cfg)
    rows = []
    try:
        for label, _, _ in ROWS:
            run_row(env, label, LatentPerfConfig(**{**cfg.__dict__, "batch": 1, "steps": 1}))
            row = count_row(env, label, cfg)
            rows.append(row)
            progress(f"syncs {label:<48} {row['syncs']:5d} ({row['syncs_per_step']:.1f}/step) {row['by_owner']}")
    finally:
        close(env)
    return {"config": dataclasses.asdict(cfg), "torch": torch.__version__, "rows": rows}


def markdown(res: Dict) -> str:
    c = res["config"]
    rows = res["rows"]
    how = rows[0]["counted"] if rows else "?"
    lines = [f"Synchronisations per row ({how}): batch {c['batch']}, {c['steps']} Heun steps of the 32-step karras "
             f"schedule, EDM2 {c['main']} guided by {c['guide']}, torch {res['torch']}.", "",
             "| row | syncs | per step | pack | ComfyUI | torch | uploads | lines that synchronised most |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        o = r["by_owner"]
        top = ", ".join(f"`{k}` {v}" for k, v in list(r["top"].items())[:5])
        lines.append(f"| {r['row']} | {r['syncs']} | {r['syncs_per_step']:.2f} | {o.get('pack', 0)} | "
                     f"{o.get('comfyui', 0)} | {o.get('torch', 0)} | {r.get('uploads', '—')} | {top} |")
    return "\n".join(lines) + "\n"
