"""The testbed's demo, benchmark and sweep: every guidance method of the pack sampled headless
(``sampler.sample`` on the shared engine) from the committed models, then scored with the
evaluation classifier only (``metrics``). Seeds are fixed; every method sees the same noise."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch

from ..guiders.config import GFCGConfig
from ..guiders.engine import resolve_mode
from ..guiders.gradient import CGConfig, softplus_copy
from .dataset import CLASS_NAMES, NUM_CLASSES, PAIR_OF, SEEDS, make_split, to_unit
from .metrics import class_precision, frechet_distance, pair_accuracy, paired_difference_bound, precision_recall
from .models import Testbed, load_testbed, logits_and_features
from .sampler import CG_METHODS, METHODS, sample

BATCH = 250   # rows per sampling call (chunk i of a run gets noise seed `seed + i`)
METHOD_LABELS = {"none": "none", "cfg": "CFG", "atg": "ATG", "gfcg": "GFCG", "gfcg+cfg": "GFCG+CFG",
                 "gfcg+atg": "GFCG+ATG", "cg": "CG (EluCD)", "cg+cfg": "CG+CFG",
                 "cg+atg": "CG+ATG"}


@dataclass
class Settings:
    """One sampling configuration of the testbed (the benchmark's, unless a sweep row overrides)."""

    steps: int = 18                 # EDM's 32x32 setting: 18 Heun steps, 35 evaluations
    cfg_scale: float = 2.0
    atg_scale: float = 2.0
    mode: str = "auto"               # the Combiner's default: swap on autoguidance, additive on CFG
    dtype: str = "bfloat16"         # diffusion trunks (EDM2 runs fp16/bf16 trunks by design); classifiers fp32
    gfcg: GFCGConfig = field(default_factory=lambda: GFCGConfig(desired_class=0))
    cg: CGConfig = field(default_factory=CGConfig)   # the gradient methods (cg, cg+cfg, cg+atg)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gfcg"].pop("desired_class", None)
        d["cg"].pop("desired_class", None)
        d["cg"]["softplus_beta"] = str(d["cg"]["softplus_beta"])  # inf is not JSON
        return d


_SOFTPLUS: Dict[tuple, torch.nn.Module] = {}


def guidance_classifier_for(tb: Testbed, method: str, settings: Settings):
    """The guidance classifier a method consults: as trained for GFCG; its Softplus(beta) copy
    (made once per beta) for the gradient methods."""
    if method not in CG_METHODS:
        return tb.guidance_classifier
    key = (id(tb.guidance_classifier), settings.cg.softplus_beta)
    if key not in _SOFTPLUS:
        _SOFTPLUS[key] = softplus_copy(tb.guidance_classifier, settings.cg.softplus_beta)[0]
    return _SOFTPLUS[key]


def Progress(total: int, label: str = ""):
    """The commands' progress bar: tqdm over sampling steps, on stderr, in ASCII (a Windows console
    in cp1252 cannot print tqdm's Unicode blocks). ``update(1)`` per step; the method being sampled
    shows as the postfix."""
    from tqdm import tqdm

    return tqdm(total=max(1, total), desc=label, unit="step", ascii=True, file=sys.stderr, dynamic_ncols=True)


def _step(progress, method: str) -> None:
    if progress.postfix != method:
        progress.set_postfix_str(method, refresh=False)
    progress.update(1)


def stack_mode(method: str, mode: str) -> str:
    """The GFCG Combiner's mode rule (``guiders.engine.resolve_mode``) for a benchmark method."""
    return resolve_mode("atg" if method.endswith("+atg") else "cfg", mode)


def class_rows(n_per_class: int) -> torch.Tensor:
    """Requested classes of a run: 0, 1, ..., 9, 0, 1, ... (every class equally often)."""
    return torch.arange(n_per_class * NUM_CLASSES) % NUM_CLASSES


@torch.no_grad()
def run_method(tb: Testbed, method: str, desired: torch.Tensor, settings: Settings, seed: int = 0,
               batch: int = BATCH, progress=None) -> dict:
    """Sample ``len(desired)`` images with ``method``: chunks of ``batch`` rows, chunk i with noise
    seed ``seed + i`` (so every method starts from the same noise). Returns images, NFE, seconds."""
    images, nfe, t0 = [], 0.0, time.time()
    clf, seen = guidance_classifier_for(tb, method, settings), [0]

    def counted(x):   # the classifier's rows: what sparse schedules and settling save
        seen[0] += int(x.shape[0])
        return clf(x)

    for i, start in enumerate(range(0, desired.shape[0], batch)):
        rows = desired[start:start + batch]
        r = sample(tb.main, counted, method, rows, rows.shape[0],
                   seed=seed + i, steps=settings.steps, guide=tb.guide, cfg_scale=settings.cfg_scale,
                   atg_scale=settings.atg_scale, gfcg=settings.gfcg, mode=stack_mode(method, settings.mode), num_classes=NUM_CLASSES,
                   cg=settings.cg,
                   progress=(lambda _s: _step(progress, method)) if progress else None)
        images.append(r.images)
        nfe += r.nfe * rows.shape[0]
    return {"images": torch.cat(images), "nfe": nfe / desired.shape[0], "seconds": time.time() - t0,
            "classifier_rows": seen[0] / desired.shape[0]}


@torch.no_grad()
def eval_outputs(tb: Testbed, images: torch.Tensor, chunk: int = 500):
    """Evaluation classifier on images in [-1, 1]: (logits, penultimate features)."""
    outs = [logits_and_features(tb.eval_classifier, to_unit(images[i:i + chunk])) for i in range(0, len(images), chunk)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def reference_features(tb: Testbed, n: int) -> torch.Tensor:
    """Penultimate features of ``n`` held-out real images (their own data seed, balanced classes)."""
    real, _ = make_split(n, SEEDS["reference"])
    return eval_outputs(tb, real)[1]


def score(tb: Testbed, images: torch.Tensor, desired: torch.Tensor, real_feats: torch.Tensor, k: int = 3) -> dict:
    logits, feats = eval_outputs(tb, images)
    hits = logits.argmax(1) == desired
    pr, rc = precision_recall(real_feats[:feats.shape[0]], feats, k)
    return {"class_precision": class_precision(logits, desired), "pair_accuracy": pair_accuracy(logits, desired, PAIR_OF),
            "fd": frechet_distance(feats, real_feats),
            "precision": pr, "recall": rc, "hits": hits}


# --------------------------------------------------------------------------------------------------
# Benchmark


def benchmark(methods: Sequence[str], n_per_class: int = 100, settings: Optional[Settings] = None, seed: int = 0,
              n_real: int = 5000, tb: Optional[Testbed] = None) -> dict:
    settings = settings or Settings()
    tb = tb or load_testbed(settings.dtype)
    desired = class_rows(n_per_class)
    real = reference_features(tb, n_real)
    chunks = math.ceil(desired.shape[0] / BATCH)
    prog = Progress(len(methods) * chunks * settings.steps, "bench")
    rows, hits = [], {}
    for m in methods:
        out = run_method(tb, m, desired, settings, seed, progress=prog)
        s = score(tb, out["images"], desired, real)
        hits[m] = s.pop("hits")
        rows.append({"method": m, **s, "nfe": out["nfe"], "seconds": out["seconds"]})
    prog.close()
    return {"n_per_class": n_per_class, "n_per_method": int(desired.shape[0]), "n_real": n_real, "seed": seed,
            "settings": settings.as_dict(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "rows": rows, "paired": paired_bounds(hits)}


# the paired class-precision differences the benchmark reports (a, b): a - b over shared noises
PAIRED = (("gfcg", "none"), ("gfcg", "cfg"), ("gfcg+cfg", "cfg"), ("gfcg+atg", "atg"))


def paired_bounds(hits: Dict[str, torch.Tensor], pairs=PAIRED) -> list:
    """For each (a, b) with both methods run: mean of hits_a - hits_b and its one-sided 99 % lower bound."""
    out = []
    for a, b in pairs:
        if a in hits and b in hits:
            mean, lo = paired_difference_bound(hits[a], hits[b])
            out.append({"a": a, "b": b, "mean": mean, "lower99": lo})
    return out


def paired_lines(result: dict) -> str:
    """The paired bounds as markdown lines."""
    return "".join(f"- {METHOD_LABELS[p['a']]} - {METHOD_LABELS[p['b']]}: {p['mean']:+.3f} (one-sided 99 % lower "
                   f"bound {p['lower99']:+.3f}, paired over {result['n_per_method']} shared noises)\n"
                   for p in result.get("paired", []))


def markdown_table(result: dict) -> str:
    lines = ["| method | class precision (higher is better) | pair accuracy | FD (lower) | precision | recall | "
             "NFE / image | wall time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {METHOD_LABELS.get(r['method'], r['method'])} | {r['class_precision']:.3f} | "
                     f"{r.get('pair_accuracy', float('nan')):.3f} | {r['fd']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['nfe']:.1f} | {r['seconds']:.0f} |")
    paired = paired_lines(result)
    return "\n".join(lines) + "\n" + ("\nPaired class-precision differences:\n\n" + paired if paired else "")


def plot_benchmark(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [METHOD_LABELS.get(r["method"], r["method"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(names, [r["class_precision"] for r in rows], color="tab:blue")
    axes[0].set_title("class precision (eval classifier), higher is better")
    axes[0].set_ylim(0, 1)
    axes[1].bar(names, [r["fd"] for r in rows], color="tab:orange")
    axes[1].set_title("FD (eval-classifier features), lower is better")
    for r, nm in zip(rows, names):
        axes[2].scatter(r["recall"], r["precision"], s=20 + 2 * r["nfe"])
        axes[2].annotate(nm, (r["recall"], r["precision"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    axes[2].set_xlabel("recall")
    axes[2].set_ylabel("precision")
    axes[2].set_title("k-NN precision / recall (marker ~ NFE)")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"testbed, {result['n_per_method']} samples per method, {result['settings']['steps']} Heun steps",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Demo


def image_grid(images: Dict[str, torch.Tensor], desired: torch.Tensor, labels: Dict[str, str], zoom: int = 4,
               rejected: Optional[Dict[str, torch.Tensor]] = None):
    """Rows = methods, columns = classes; each cell holds that method's samples of that class side
    by side. ``images[m]``: [N, 3, H, W] in [-1, 1], row i requested class ``desired[i]``.
    ``rejected[m]`` [N] bool: samples the evaluation classifier does not see as their class get a
    red frame (a wrong member of the pair, or the wrong shape altogether)."""
    from PIL import Image, ImageDraw

    per = int((desired == 0).sum())
    res = next(iter(images.values())).shape[-1] * zoom
    left, top, pad, gap = 150, 22, 4, 2
    cell_w = per * (res + gap) + pad
    w, h = left + NUM_CLASSES * cell_w, top + len(images) * (res + pad)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(CLASS_NAMES):
        draw.text((left + c * cell_w + 2, 5), name, fill=(0, 0, 0))
    for r, (m, imgs) in enumerate(images.items()):
        y = top + r * (res + pad)
        draw.text((4, y + res // 2 - 12), labels[m], fill=(0, 0, 0))
        pix = (to_unit(imgs) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for c in range(NUM_CLASSES):
            idx = (desired == c).nonzero().squeeze(1).tolist()
            for j, i in enumerate(idx):
                tile = Image.fromarray(pix[i]).resize((res, res), Image.NEAREST)
                x = left + c * cell_w + j * (res + gap)
                canvas.paste(tile, (x, y))
                if rejected is not None and bool(rejected[m][i]):
                    draw.rectangle([x, y, x + res - 1, y + res - 1], outline=(230, 0, 0), width=3)
    return canvas


def demo(out_dir: str, n_per_class: int = 2, seed: int = 0, settings: Optional[Settings] = None,
         methods: Sequence[str] = tuple(METHODS)) -> dict:
    """Sample every method for every class from the same noise, score with the evaluation
    classifier, write ``demo_grid.png`` and ``demo.json``; print the precision table."""
    t0 = time.time()
    settings = settings or Settings()
    tb = load_testbed(settings.dtype)
    desired = class_rows(n_per_class)
    prog = Progress(len(methods) * settings.steps, "demo")
    images, rows, rejected = {}, [], {}
    for m in methods:
        out = run_method(tb, m, desired, settings, seed, batch=desired.shape[0], progress=prog)
        logits, _ = eval_outputs(tb, out["images"])
        images[m] = out["images"]
        rejected[m] = logits.argmax(1) != desired
        rows.append({"method": m, "class_precision": class_precision(logits, desired),
                     "pair_accuracy": pair_accuracy(logits, desired, PAIR_OF), "nfe": out["nfe"],
                     "seconds": round(out["seconds"], 2)})
    prog.close()
    labels = {r["method"]: f"{METHOD_LABELS[r['method']]}\nprecision {r['class_precision']:.2f}" for r in rows}
    os.makedirs(out_dir, exist_ok=True)
    png, js = os.path.join(out_dir, "demo_grid.png"), os.path.join(out_dir, "demo.json")
    image_grid(images, desired, labels, rejected=rejected).save(png)
    result = {"n_per_class": n_per_class, "seed": seed, "settings": settings.as_dict(), "classes": list(CLASS_NAMES),
              "rows": rows, "seconds": round(time.time() - t0, 1), "grid": os.path.basename(png),
              "red_frame": "the evaluation classifier does not see the sample as its requested class"}
    with open(js, "w") as f:
        json.dump(result, f, indent=1)
    return result


# --------------------------------------------------------------------------------------------------
# Sweep of the GFCG settings (one axis at a time around the base settings)


def sweep_rows() -> list:
    """(name, method, overrides of Settings, overrides of GFCGConfig) per row."""
    rows = [("none", "none", {}, {})]
    rows += [(f"CFG w={w}", "cfg", {"cfg_scale": w}, {}) for w in (1.5, 2.0, 3.0)]
    rows += [(f"ATG w={w}", "atg", {"atg_scale": w}, {}) for w in (1.5, 2.0, 3.0)]
    rows += [("GFCG base (tau .5, alpha 2, beta 1)", "gfcg", {}, {})]
    rows += [(f"GFCG tau={t}", "gfcg", {}, {"tau": t}) for t in (0.3, 0.7, 0.9)]
    rows += [(f"GFCG alpha={a}", "gfcg", {}, {"alpha": a}) for a in (1.0, 4.0, 8.0, 16.0)]
    rows += [(f"GFCG beta={b}", "gfcg", {}, {"beta": b}) for b in (0.5, 2.0)]
    rows += [(f"GFCG window {s}-{e}", "gfcg", {}, {"window_start": s, "window_end": e}) for s, e in ((0.0, 0.5), (0.5, 1.0))]
    rows += [(f"GFCG period={p}", "gfcg", {}, {"period": p}) for p in (2, 4)]
    rows += [("GFCG classify previous", "gfcg", {}, {"classify_input": "previous"}),
             ("GFCG reference stochastic", "gfcg", {}, {"reference_mode": "stochastic"})]
    for m in ("gfcg+cfg", "gfcg+atg"):
        rows += [(f"{METHOD_LABELS[m]} {mode}", m, {"mode": mode}, {}) for mode in ("additive", "swap")]
    # second stage: the per-axis winners together (alpha 4 and period 4 each beat the base by
    # more than one standard error; tau 0.7 by less)
    rows += [("GFCG alpha=4 period=4", "gfcg", {}, {"alpha": 4.0, "period": 4}),
             ("GFCG alpha=4 period=4 tau=0.7", "gfcg", {}, {"alpha": 4.0, "period": 4, "tau": 0.7})]
    # swap mode's scale rule on GFCG + ATG (the form with no extra evaluations; core.swap_scale):
    # the literal formula (omega) from alpha 0.5 up, as the paper's first experiments use 0.5
    for rule, alphas in (("sum", (2.0, 4.0, 8.0)), ("max", (2.0, 4.0, 8.0)), ("omega", (0.5, 1.0, 2.0, 4.0)),
                         ("base", (4.0,))):
        rows += [(f"GFCG+ATG swap {rule} alpha={a}", "gfcg+atg", {"mode": "swap"}, {"swap_rule": rule, "alpha": a})
                 for a in alphas]
    # sparse classifier schedules (the paper's ts / scp): the window starts late, the classifier
    # runs every `period` steps inside it (18 steps: start 0.5 period 8 classifies at 2 steps)
    rows += [(f"GFCG sparse start={s} period={p}", "gfcg", {}, {"window_start": s, "period": p})
             for s, p in ((0.25, 4), (0.5, 4), (0.5, 8), (0.0, 8))]
    # per-sample settling: a sample confident on k consecutive classifier steps is not classified again
    rows += [(f"GFCG settle after {k}", "gfcg", {}, {"settle_after": k}) for k in (2, 4)]
    # the cost issue's question: GFCG + ATG in swap mode (ATG's NFE) with fewer classifier calls
    for a in (4.0, 8.0):
        rows += [(f"GFCG+ATG swap alpha={a:g} {name}", "gfcg+atg", {"mode": "swap"}, {"alpha": a, **over})
                 for name, over in SCHEDULES]
    # off-the-shelf gradient guidance (all pre-conditioning on): its scale s for the testbed
    rows += [(f"CG s={s}", "cg", {"cg": CGConfig(scale=s)}, {}) for s in CG_SWEEP_SCALES]
    return rows


# classifier schedules tried on GFCG + ATG swap (name, GFCGConfig overrides)
SCHEDULES = (("period=2", {"period": 2}), ("start=0.25 period=4", {"window_start": 0.25, "period": 4}),
             ("settle after 4", {"settle_after": 4}), ("period=2 settle after 4", {"period": 2, "settle_after": 4}))

CG_SWEEP_SCALES = (0.004, 0.01, 0.02, 0.04, 0.08)
CG_SCALE = 0.02   # the testbed's s, from the sweep's CG rows by the README's rule (highest class precision
                  # unless FD gets more than 1 worse than unguided: s = 0.04 had FD +2.8)


def cg_ablation_rows(scale: float = CG_SCALE) -> list:
    """(name, method, Settings overrides): unguided, GFCG, then gradient guidance with EluCD's
    pre-conditioning steps switched on one at a time, at one scale s (the RMS-normalised step
    makes s the displacement size in every row)."""
    plain = CGConfig(scale=scale, gamma=0.0, softplus_beta=math.inf, tau1=1.0, tau2=1.0, classifier_input="noisy")
    steps = [("CG: noisy x input, ReLU, conditional, linear schedule", {}),
             ("+ x0_hat input", {"classifier_input": "denoised"}),
             ("+ Softplus (beta 5)", {"softplus_beta": 5.0}),
             ("+ joint/marginal (tau2 0)", {"tau2": 0.0}),
             ("+ sine schedule (gamma 0.3) = EluCD", {"gamma": 0.3})]
    rows = [("none", "none", {}), ("GFCG", "gfcg", {})]
    cfg = plain
    for name, change in steps:
        cfg = dataclasses.replace(cfg, **change)
        rows.append((name, "cg", {"cg": cfg}))
    return rows


def cg_benchmark(n_per_class: int = 100, settings: Optional[Settings] = None, seed: int = 0, n_real: int = 5000,
                 scale: float = CG_SCALE) -> dict:
    """The ablation rows on the benchmark's noise (seed 0+, 1000 samples), with wall time."""
    base = settings or Settings()
    tb = load_testbed(base.dtype)
    desired = class_rows(n_per_class)
    real = reference_features(tb, n_real)
    rows = cg_ablation_rows(scale)
    prog = Progress(len(rows) * math.ceil(desired.shape[0] / BATCH) * base.steps, "cg-bench")
    results = []
    for name, method, over in rows:
        st = dataclasses.replace(base, **over)
        out = run_method(tb, method, desired, st, seed, progress=prog)
        sc = score(tb, out["images"], desired, real)
        hits = sc.pop("hits").double()
        results.append({"name": name, "method": method, **sc, "se": float(hits.std() / math.sqrt(hits.numel())),
                        "nfe": out["nfe"], "seconds": out["seconds"],
                        "classifier_passes": out["nfe"] if method in CG_METHODS else None,
                        "cg": st.as_dict()["cg"] if method in CG_METHODS else None})
    prog.close()
    return {"n_per_class": n_per_class, "n_per_method": int(desired.shape[0]), "seed": seed, "scale": scale,
            "settings": base.as_dict(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "rows": results}


# --------------------------------------------------------------------------------------------------
# Configurations of GFCG + ATG on the benchmark's noise: the old shipped one, swap mode, the new
# shipped one (the cost issue), each with paired bounds against the old one and against ATG

# GFCGConfig overrides of the autoguidance workflows as shipped now (docs/testbed.md, "GFCG + ATG
# configurations"): of the cheaper schedules compared on 1000 samples, the cheapest whose class
# precision matches the former additive every-step setting at its FD (7.9 classifier rows per
# image against 18; alpha 8 gained precision but lost FD, 1.42 against 0.98)
SHIPPED_ATG = {"mode": "swap", "gfcg": {"alpha": 4.0, "period": 2, "settle_after": 4}}
OLD_ATG = {"mode": "additive", "gfcg": {"alpha": 4.0}}     # until 2026-12: additive, every step


def config_rows() -> list:
    """(name, method, Settings overrides, GFCGConfig overrides)."""
    return [("ATG", "atg", {}, {}),
            ("GFCG+ATG old (additive, every step)", "gfcg+atg", {"mode": OLD_ATG["mode"]}, OLD_ATG["gfcg"]),
            ("GFCG+ATG node defaults (auto = swap, every step)", "gfcg+atg", {"mode": "auto"}, {}),
            *[(f"GFCG+ATG swap, alpha {g['alpha']:g}, period {g['period']}, settle_after {g['settle_after']}"
               + (" (shipped)" if g == SHIPPED_ATG["gfcg"] else ""), "gfcg+atg", {"mode": "swap"}, g)
              for g in CANDIDATES]]


# the cheaper schedules compared (the sweep's cheapest rows within one standard error of its best
# GFCG + ATG swap row, at alpha 8, and the same schedules at the node default alpha 4)
CANDIDATES = [{"alpha": a, "period": p, "settle_after": k}
              for a, p, k in ((8.0, 2, 4), (4.0, 2, 4), (4.0, 2, 0), (4.0, 1, 4))]


def compare_configs(n_per_class: int = 100, settings: Optional[Settings] = None, seed: int = 0, n_real: int = 5000,
                    tb: Optional[Testbed] = None) -> dict:
    """Every configuration on the benchmark's noise (seed 0+), scored; paired class-precision
    differences of each against the old configuration and against ATG (one-sided 99 % bounds)."""
    base = settings or Settings()
    tb = tb or load_testbed(base.dtype)
    desired = class_rows(n_per_class)
    real = reference_features(tb, n_real)
    rows = config_rows()
    prog = Progress(len(rows) * math.ceil(desired.shape[0] / BATCH) * base.steps, "configs")
    results, hits = [], {}
    for name, method, s_over, g_over in rows:
        st = dataclasses.replace(base, **s_over, gfcg=dataclasses.replace(base.gfcg, **g_over))
        out = run_method(tb, method, desired, st, seed, progress=prog)
        sc = score(tb, out["images"], desired, real)
        hits[name] = sc.pop("hits")
        results.append({"name": name, "method": method, "mode": st.mode, "gfcg": g_over, **sc, "nfe": out["nfe"],
                        "classifier_rows": out["classifier_rows"], "seconds": out["seconds"]})
    prog.close()
    old, atg = rows[1][0], rows[0][0]
    paired = []
    for name, *_ in rows[1:]:
        for b in (old, atg):
            if name != b:
                mean, lo = paired_difference_bound(hits[name], hits[b])
                paired.append({"a": name, "b": b, "mean": mean, "lower99": lo,
                               "upper99": mean + (mean - lo)})   # the bound is symmetric: mean -/+ 2.326 s.e.
    return {"n_per_class": n_per_class, "n_per_method": int(desired.shape[0]), "seed": seed,
            "settings": base.as_dict(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "rows": results, "paired": paired}


def configs_markdown(result: dict) -> str:
    lines = ["| configuration | class precision | pair accuracy | FD | precision | recall | NFE / image | "
             "classifier rows / image | wall time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['class_precision']:.3f} | {r['pair_accuracy']:.3f} | {r['fd']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['nfe']:.1f} | {r['classifier_rows']:.1f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", f"Paired class-precision differences ({result['n_per_method']} shared noises; one-sided 99 % "
              "bounds, lower and upper):", ""]
    lines += [f"- {p['a']} - {p['b']}: {p['mean']:+.3f} (lower {p['lower99']:+.3f}, upper {p['upper99']:+.3f})"
              for p in result["paired"]]
    return "\n".join(lines) + "\n"


def cg_markdown_table(result: dict) -> str:
    lines = ["| method | class precision ± s.e. (higher is better) | FD (lower) | precision | recall | NFE / image | "
             "classifier passes / image | wall time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in result["rows"]:
        cp = "—" if r["classifier_passes"] is None else f"{r['classifier_passes']:.0f} fwd+bwd"
        if r["method"] == "gfcg":
            cp = f"{result['settings']['steps']} fwd (once per step)"
        lines.append(f"| {r['name']} | {r['class_precision']:.3f} ± {r['se']:.3f} | {r['fd']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['nfe']:.1f} | {cp} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def run_sweep(out_dir: str, n_per_class: int = 20, settings: Optional[Settings] = None, seed: int = 1000,
              only: Optional[Sequence[str]] = None, n_real: int = 5000) -> dict:
    """Every sweep row on the same noise (seed 1000+, apart from the benchmark's seed 0), scored
    with the evaluation classifier; writes sweep.json and sweep.md."""
    base = settings or Settings()
    tb = load_testbed(base.dtype)
    desired = class_rows(n_per_class)
    real = reference_features(tb, n_real)
    rows = [r for r in sweep_rows() if not only or r[0] in only]
    prog = Progress(len(rows) * math.ceil(desired.shape[0] / BATCH) * base.steps, "sweep")
    results = []
    for name, method, s_over, g_over in rows:
        st = dataclasses.replace(base, **s_over, gfcg=dataclasses.replace(base.gfcg, **g_over))
        out = run_method(tb, method, desired, st, seed, progress=prog)
        sc = score(tb, out["images"], desired, real)
        hits = sc.pop("hits").double()
        results.append({"name": name, "method": method, **sc, "se": float(hits.std() / math.sqrt(hits.numel())),
                        "nfe": out["nfe"], "classifier_rows": out["classifier_rows"], "seconds": out["seconds"]})
    prog.close()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "sweep.json")
    if only and os.path.exists(path):  # merge into the committed sweep (same seed, size and base only)
        old = json.load(open(path))
        # rows set their own cg; gradient-guidance rows do not read the GFCG settings either
        ignore = {"cg"} | ({"gfcg"} if all(r["method"] in CG_METHODS for r in results) else set())
        same = lambda d: {k: v for k, v in d.items() if k not in ignore}   # noqa: E731
        if (old["seed"], old["n_per_class"], same(old["base"])) == (seed, n_per_class, same(base.as_dict())):
            new = {r["name"]: r for r in old["rows"]}
            new.update({r["name"]: r for r in results})
            results = [new[r[0]] for r in sweep_rows() if r[0] in new]
            base_dict = old["base"]
        else:
            print(f"sweep: the committed {path} has another seed, size or base; writing only the rows run now")
            base_dict = base.as_dict()
    else:
        base_dict = base.as_dict()
    res = {"n_per_class": n_per_class, "seed": seed, "base": base_dict, "rows": results}
    write_sweep(out_dir, res)
    return res


def write_sweep(out_dir: str, res: dict) -> None:
    """sweep.json and the markdown table sweep.md (also printed)."""
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = ["| setting | class precision ± s.e. | pair accuracy | FD | precision | recall | NFE / image | "
             "classifier rows / image |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        lines.append(f"| {r['name']} | {r['class_precision']:.3f} ± {r['se']:.3f} | {r.get('pair_accuracy', float('nan')):.3f} "
                     f"| {r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['nfe']:.1f} "
                     f"| {r.get('classifier_rows', float('nan')):.1f} |")
    with open(os.path.join(out_dir, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
