"""``python -m comfyui_gfcg bench --perf --memory-study``: where GFCG's extra host memory goes on a
CPU, and what each remedy costs.

On a CPU, PyTorch's convolutions run through oneDNN, which keeps a primitive (kernel and its
buffers) per input shape in a cache (LRU, 1024 entries by default). A method whose forwards change
their row count from step to step -- GFCG alone and additive (D_ref on the confused rows only),
the settled classifier rows of ``settle_after`` -- fills it with one entry set per row count;
fixed-size methods (CFG, ATG, swap every step) reuse one. Each row (method) runs in fresh
processes, three ways:

- ``cache``: as users run it;
- ``no cache``: ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`` (every forward rebuilds its primitives);
- ``buckets``: every forward of every model and of the classifier padded up to a multiple of
  ``batch / 8`` rows (at most 16 shapes per model at batch 64), the padding's outputs dropped.

Per way: sampling memory (peak resident set minus the set with the models loaded), the median
wall time of 3 runs in that process, the distinct row counts the models saw, and the rows the
padding adds (compute). The processes run one after another, not interleaved, so their times
carry this machine's drift.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

ROWS = ["ATG", "GFCG", "GFCG+ATG additive", "GFCG+ATG swap", "GFCG+ATG shipped"]
WAYS = ["cache", "no cache", "buckets"]


def bucket_rows(n: int, quantum: int) -> int:
    """The padded row count: ``n`` rounded up to a multiple of ``quantum``, i.e. q * ceil(n / q)."""
    if quantum < 1:
        raise ValueError(f"quantum must be >= 1, got {quantum}")
    return -(-n // quantum) * quantum


class Bucketed:
    """A model or classifier called as ``fn(x, *args)``: records the row counts it is given and,
    with ``quantum`` > 1, pads x (and every tensor argument with x's row count) to
    ``bucket_rows`` by repeating the last row, returning the first ``n`` output rows."""

    def __init__(self, fn, quantum: int = 1):
        self.fn, self.quantum = fn, quantum
        self.shapes: set = set()
        self.rows = self.padded = 0

    def __getattr__(self, name):           # the wrapped model's attributes (its config, ...)
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, x, *args, **kwargs):
        n = int(x.shape[0])
        m = bucket_rows(n, self.quantum)
        self.shapes.add(m)
        self.rows += n
        self.padded += m - n
        if m == n:
            return self.fn(x, *args, **kwargs)

        def pad(t):
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n:
                return torch.cat([t, t[-1:].expand(m - n, *t.shape[1:])])
            return t
        return self.fn(pad(x), *[pad(a) for a in args], **kwargs)[:n]


def worker(label: str, way: str, n: int = 64, steps: int = 18, dtype: str = "bfloat16", reps: int = 3) -> dict:
    """In a fresh process: load, warm up, reset the peak-RSS mark, run ``reps`` times, read the peak."""
    from .bench import Settings, guidance_classifier_for
    from .models import load_testbed
    from .perf import PerfConfig, _row, _status_kb, reset_peak_rss, run_row

    tb = load_testbed(dtype)
    cfg = PerfConfig(n=n, settings=Settings(steps=steps, dtype=dtype))
    method = _row(label)[1]
    q = max(1, n // 8) if way == "buckets" else 1
    clf = guidance_classifier_for(tb, method, cfg.settings)
    wrapped = dataclasses.replace(tb, main=Bucketed(tb.main, q), guide=Bucketed(tb.guide, q),
                                  guidance_classifier=Bucketed(clf, q))
    run_row(wrapped, label, dataclasses.replace(cfg, n=2))      # warm-up: lazy inits, allocator
    for m in (wrapped.main, wrapped.guide, wrapped.guidance_classifier):
        m.shapes, m.rows, m.padded = set(), 0, 0
    if not reset_peak_rss():
        raise SystemExit("the memory study needs Linux's /proc/self/clear_refs to reset the peak RSS")
    base = _status_kb("VmRSS")
    secs = []
    for _ in range(reps):
        t = time.perf_counter()
        run_row(wrapped, label, cfg)
        secs.append(time.perf_counter() - t)
    peak = _status_kb("VmHWM")
    ms = (wrapped.main, wrapped.guide, wrapped.guidance_classifier)
    return {"row": label, "way": way, "sampling_mb": (peak - base) / 1024, "seconds": statistics.median(secs),
            "shapes": [len(m.shapes) for m in ms],
            "pad_fraction": sum(m.padded for m in ms[:2]) / max(1, sum(m.rows for m in ms[:2])),
            "classifier_pad_fraction": ms[2].padded / max(1, ms[2].rows)}


def run(rows: Optional[List[str]] = None, n: int = 64, steps: int = 18, dtype: str = "bfloat16", reps: int = 3,
        progress=print) -> dict:
    out: List[dict] = []
    for label in rows or ROWS:
        for way in WAYS:
            env = dict(os.environ)
            if way == "no cache":
                env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "0"
            args = [sys.executable, "-m", "comfyui_gfcg.testbed.perf_memory", "--worker", label, "--way", way,
                    "--n", str(n), "--steps", str(steps), "--dtype", dtype, "--reps", str(reps)]
            r = json.loads(subprocess.run(args, capture_output=True, text=True, check=True, env=env)
                           .stdout.strip().splitlines()[-1])
            progress(f"{label:<20} {way:<9} {r['sampling_mb']:6.0f} MB  {r['seconds']:6.2f} s  shapes {r['shapes']}")
            out.append(r)
    return {"n": n, "steps": steps, "dtype": dtype, "reps": reps, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "rows": out}


def markdown(res: dict) -> str:
    by: Dict[tuple, dict] = {(r["row"], r["way"]): r for r in res["rows"]}
    labels = list(dict.fromkeys(r["row"] for r in res["rows"]))
    lines = [f"Sampling memory on the CPU (testbed, {res['n']} images in one batch, {res['steps']} Heun steps, "
             f"trunks {res['dtype']}; cpu, {res['threads']} threads, torch {res['torch']}); each cell one fresh "
             f"process, wall time the median of {res['reps']} runs in it (processes not interleaved). Buckets: "
             f"every forward padded to a multiple of {max(1, res['n'] // 8)} rows.", "",
             "| method | distinct row counts (main, guide, classifier) | sampling memory (MB): cache / no cache / "
             "buckets | wall time (s): cache / no cache / buckets | rows added by buckets (models, classifier) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for label in labels:
        c, z, b = (by.get((label, w)) for w in WAYS)
        if not (c and z and b):
            continue
        shapes = ", ".join(map(str, c["shapes"])) + ("" if b["shapes"] == c["shapes"] else
                                                      " (buckets: " + ", ".join(map(str, b["shapes"])) + ")")
        lines.append(f"| {label} | {shapes} | {c['sampling_mb']:.0f} / "
                     f"{z['sampling_mb']:.0f} / {b['sampling_mb']:.0f} | {c['seconds']:.2f} / {z['seconds']:.2f} / "
                     f"{b['seconds']:.2f} | {100 * b['pad_fraction']:.1f} %, {100 * b['classifier_pad_fraction']:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m comfyui_gfcg.testbed.perf_memory")
    p.add_argument("--worker", required=True)
    p.add_argument("--way", choices=WAYS, default="cache")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    print(json.dumps(worker(a.worker, a.way, a.n, a.steps, a.dtype, a.reps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
