"""``python -m comfyui_gfcg bench --perf``: what each guidance method costs, on the testbed.

Per method: denoiser evaluations (rows) per image over all models (NFE), model forwards per
sampler evaluation, classifier rows per image, wall time as a ratio to CFG and to ATG measured in
the same run (interleaved repetitions, median), and peak memory (each method in a fresh process:
the peak resident set over the one with the models loaded). Then the classifier step (decode +
classify) as a fraction of one denoiser evaluation: for the testbed (pixel space: no decoder)
and, when a ComfyUI checkout is found, for each decode choice of a latent model (EDM2-S img512,
the SD VAE, TAESD, latent-to-RGB; ``decode_bench``).

The targets of the issue are checked on these numbers and stated as met or missed.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .bench import SHIPPED_ATG, Settings, guidance_classifier_for

# (label, method, mode, GFCGConfig overrides)
ROWS = [
    ("none", "none", "additive", {}),
    ("CFG", "cfg", "additive", {}),
    ("ATG", "atg", "additive", {}),
    ("GFCG", "gfcg", "additive", {}),
    ("GFCG, classify previous", "gfcg", "additive", {"classify_input": "previous"}),
    ("GFCG+CFG additive", "gfcg+cfg", "additive", {}),
    ("GFCG+CFG swap", "gfcg+cfg", "swap", {}),
    ("GFCG+ATG additive", "gfcg+atg", "additive", {}),
    ("GFCG+ATG swap", "gfcg+atg", "swap", {}),
    ("GFCG+ATG shipped", "gfcg+atg", SHIPPED_ATG["mode"], SHIPPED_ATG["gfcg"]),
    ("CG (EluCD)", "cg", "additive", {}),
]

# (row, measure, base row, limit): the targets
TARGETS = [
    ("GFCG", "nfe", "CFG", 1.0),
    ("GFCG+CFG swap", "nfe", "CFG", 1.0),
    ("GFCG+ATG swap", "nfe", "ATG", 1.0),
    ("GFCG+CFG additive", "nfe", "CFG", 1.5),
    ("GFCG+ATG additive", "nfe", "ATG", 1.5),
    ("GFCG+ATG swap", "seconds", "ATG", 1.05),
    ("GFCG+ATG shipped", "nfe", "ATG", 1.0),
    ("GFCG+ATG shipped", "seconds", "ATG", 1.02),
]


class Counted:
    """A model or classifier that counts its calls and the rows it was given."""

    def __init__(self, fn):
        self.fn, self.calls, self.rows = fn, 0, 0

    def __call__(self, x, *args, **kwargs):
        self.calls += 1
        self.rows += int(x.shape[0])
        return self.fn(x, *args, **kwargs)


def evaluations(steps: int) -> int:
    """Sampler evaluations of EDM's Heun over ``steps`` steps (Euler on the last)."""
    return 2 * steps - 1


@dataclass
class PerfConfig:
    n: int = 64                    # images per run (one batch)
    reps: int = 5                  # timed repetitions per method (interleaved; median)
    seed: int = 0
    settings: Settings = field(default_factory=Settings)
    rows: List[str] = field(default_factory=lambda: [r[0] for r in ROWS])
    memory: bool = True            # peak memory per method, each in a fresh process
    decode: bool = True            # decode choices of a latent model (needs ComfyUI)
    comfyui: Optional[str] = None


def _row(label: str):
    for r in ROWS:
        if r[0] == label:
            return r
    raise ValueError(f"--rows: unknown row {label!r}; allowed: {[r[0] for r in ROWS]}")


def run_row(tb, label: str, cfg: PerfConfig) -> dict:
    """One sampling run of a row (all ``cfg.n`` images in one batch): counts and seconds."""
    from .bench import class_rows
    from .sampler import sample

    _, method, mode, over = _row(label)
    st = cfg.settings
    main, guide = Counted(tb.main), Counted(tb.guide)
    clf = Counted(guidance_classifier_for(tb, method, st))
    desired = class_rows(-(-cfg.n // 10))[:cfg.n]
    t0 = time.perf_counter()
    sample(main, clf, method, desired, cfg.n, seed=cfg.seed, steps=st.steps, guide=guide, cfg_scale=st.cfg_scale,
           atg_scale=st.atg_scale, gfcg=dataclasses.replace(st.gfcg, **over), mode=mode, num_classes=10, cg=st.cg)
    seconds = time.perf_counter() - t0
    ev = evaluations(st.steps)
    return {"seconds": seconds, "nfe": (main.rows + guide.rows) / cfg.n,
            "forwards_per_eval": (main.calls + guide.calls) / ev, "main_forwards_per_eval": main.calls / ev,
            "guide_forwards_per_eval": guide.calls / ev, "classifier_rows_per_image": clf.rows / cfg.n}


def classifier_step_cost(tb, cfg: PerfConfig) -> dict:
    """Testbed: the classifier on ``n`` estimates against one main-model forward on ``n`` rows."""
    import torch.nn.functional as F

    n = cfg.n
    g = torch.Generator().manual_seed(1)
    res = tb.main.config.img_resolution
    x = torch.randn(n, 3, res, res, generator=g)
    labels = F.one_hot(torch.arange(n) % 10, 10).float()
    x0 = torch.rand(n, 3, res, res, generator=g)

    def med(fn):
        fn()
        ts = []
        for _ in range(max(3, cfg.reps)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    with torch.no_grad():
        denoise = med(lambda: tb.main(x, 1.0, labels))
        classify = med(lambda: tb.guidance_classifier(x0))
    return {"batch": n, "denoiser_s": denoise, "classify_s": classify, "fraction": classify / denoise}


# ----------------------------------------------------------------------------------------------- memory

def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux: 5 to /proc/self/clear_refs resets VmHWM);
    False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(label: str, cfg: PerfConfig) -> dict:
    """In a fresh process: load the models, warm up, reset the peak-RSS mark, run, read the peak."""
    from .models import load_testbed

    tb = load_testbed(cfg.settings.dtype)
    run_row(tb, label, dataclasses.replace(cfg, n=2))           # warm-up (lazy inits, allocator)
    reset = reset_peak_rss()
    base = _status_kb("VmRSS")
    run_row(tb, label, cfg)
    peak = _status_kb("VmHWM")
    if base is None or peak is None:
        import resource

        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "sampling_mb": None}
    return {"peak_rss_mb": peak / 1024, "loaded_rss_mb": base / 1024,
            "sampling_mb": (peak - base) / 1024 if reset else None}


def measure_memory(label: str, cfg: PerfConfig) -> dict:
    args = [sys.executable, "-m", "comfyui_gfcg.testbed.perf", "--memory-worker", label, "--n", str(cfg.n),
            "--steps", str(cfg.settings.steps), "--dtype", cfg.settings.dtype, "--seed", str(cfg.seed)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- the run

def run(cfg: PerfConfig, progress=print) -> dict:
    from .models import load_testbed

    st = cfg.settings
    tb = load_testbed(st.dtype)
    labels = list(cfg.rows)
    for label in labels:
        _row(label)
    for label in labels:                                       # warm-up of every code path
        run_row(tb, label, dataclasses.replace(cfg, n=2))
    runs: Dict[str, List[dict]] = {label: [] for label in labels}
    for rep in range(cfg.reps):                                # interleaved: drifts hit every method alike
        for label in labels:
            r = run_row(tb, label, cfg)
            runs[label].append(r)
            progress(f"rep {rep + 1}/{cfg.reps} {label:<26} {r['seconds']:7.2f} s  NFE {r['nfe']:.1f}")
    rows = []
    for label in labels:
        rs = runs[label]
        row = {"row": label, "method": _row(label)[1], "mode": _row(label)[2], **rs[0],
               "seconds": statistics.median(r["seconds"] for r in rs), "seconds_all": [r["seconds"] for r in rs]}
        for k in ("nfe", "forwards_per_eval", "classifier_rows_per_image"):
            if len({r[k] for r in rs}) != 1:
                raise RuntimeError(f"{label}: {k} differs between repetitions: {[r[k] for r in rs]}")
        rows.append(row)
    by = {r["row"]: r for r in rows}
    for r in rows:
        for base in ("CFG", "ATG"):
            r[f"seconds_vs_{base}"] = r["seconds"] / by[base]["seconds"] if base in by else None
            r[f"nfe_vs_{base}"] = r["nfe"] / by[base]["nfe"] if base in by else None
    if cfg.memory:
        for r in rows:
            r.update(measure_memory(r["row"], cfg))
            progress(f"memory {r['row']:<26} peak RSS {r['peak_rss_mb']:.0f} MB")
    result = {"n": cfg.n, "reps": cfg.reps, "seed": cfg.seed, "evaluations_per_run": evaluations(st.steps),
              "resolution": tb.main.config.img_resolution,
              "settings": st.as_dict(), "device": "cpu", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows, "targets": check_targets(rows),
              "classifier_step": {"testbed": classifier_step_cost(tb, cfg)}}
    if cfg.decode:
        result["classifier_step"]["latent"] = latent_decode_costs(cfg)
    return result


def latent_decode_costs(cfg: PerfConfig) -> Optional[dict]:
    """The decode choices of a latent model through ComfyUI's decoders (``decode_bench``, costs
    only); None with the reason when no ComfyUI checkout is found."""
    from . import decode_bench

    try:
        return decode_bench.run(reps=cfg.reps, comfyui=cfg.comfyui, agreement=False, gradient=False)
    except SystemExit as e:
        return {"skipped": str(e)}


def check_targets(rows: List[dict]) -> List[dict]:
    by = {r["row"]: r for r in rows}
    out = []
    for row, measure, base, limit in TARGETS:
        if row not in by or base not in by:
            continue
        ratio = by[row][measure] / by[base][measure]
        out.append({"row": row, "measure": measure, "base": base, "limit": limit, "ratio": ratio,
                    "met": ratio <= limit + 1e-12})
    return out


def markdown(res: dict) -> str:
    st = res["settings"]
    lines = [f"Testbed (EDM2-type {res.get('resolution', 32)}x{res.get('resolution', 32)} pixel models, {st['dtype']} trunks; classifier fp32), {res['n']} images in one "
             f"batch, {st['steps']} Heun steps = {res['evaluations_per_run']} evaluations, CFG / ATG scale "
             f"{st['cfg_scale']} / {st['atg_scale']}, GFCG tau {st['gfcg']['tau']} alpha {st['gfcg']['alpha']}; "
             f"{res['device']}, {res['threads']} threads, torch {res['torch']}; wall time = median of {res['reps']} "
             "interleaved runs.", "",
             "| method | NFE / image | model forwards / evaluation (main + guide) | classifier rows / image | "
             "wall time (s) | runs (s) | × CFG | × ATG | peak RSS (MB) | sampling memory (MB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        mem = "—" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"
        sm = "—" if r.get("sampling_mb") is None else f"{r['sampling_mb']:.0f}"
        fw = f"{r['forwards_per_eval']:.2f} ({r['main_forwards_per_eval']:.2f} + {r['guide_forwards_per_eval']:.2f})"
        lines.append(f"| {r['row']} | {r['nfe']:.1f} | {fw} | {r['classifier_rows_per_image']:.1f} | "
                     f"{r['seconds']:.2f} | {min(r['seconds_all']):.1f}–{max(r['seconds_all']):.1f} | "
                     f"{r['seconds_vs_CFG']:.2f} | {r['seconds_vs_ATG']:.2f} | {mem} | {sm} |")
    lines += ["", "| target | measured | met |", "| --- | ---: | --- |"]
    for t in res["targets"]:
        what = "NFE" if t["measure"] == "nfe" else "wall time"
        lines.append(f"| {t['row']} {what} <= {t['limit']:g} × {t['base']} | {t['ratio']:.3f} × | "
                     f"{'yes' if t['met'] else 'NO, by ' + format(t['ratio'] / t['limit'] - 1, '.1%')} |")
    cs = res["classifier_step"]
    tb = cs["testbed"]
    lines += ["", f"Classifier step, testbed (pixel space, no decoder): the guidance classifier on {tb['batch']} "
              f"estimates takes {tb['classify_s'] * 1000:.1f} ms against {tb['denoiser_s'] * 1000:.1f} ms for one "
              f"main-model forward on {tb['batch']} rows: **{tb['fraction']:.3f}** of a denoiser evaluation."]
    lat = cs.get("latent")
    if lat and "rows" in lat:
        lines += ["", f"Classifier step of a latent model, per image: {lat['denoiser']}; one evaluation = "
                  f"{lat['denoiser_s'] * 1000:.0f} ms; classifier {lat['classifier']} = "
                  f"{lat['classify_s'] * 1000:.0f} ms. VAE: {lat['vae']}; TAESD: {lat['taesd']}.", "",
                  "| decode | resolution | decode + classify / denoiser evaluation |", "| --- | ---: | ---: |"]
        for r in lat["rows"]:
            lines.append(f"| {r['decode']} | {r['resolution']:g} | {r['path_rel']:.3f} |")
    elif lat:
        lines += ["", f"Decode choices of a latent model: not measured ({lat.get('skipped')})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m comfyui_gfcg.testbed.perf")
    p.add_argument("--memory-worker", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = PerfConfig(n=a.n, seed=a.seed, settings=Settings(steps=a.steps, dtype=a.dtype))
    print(json.dumps(memory_worker(a.memory_worker, cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
