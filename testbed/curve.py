"""The main model's training curve in the benchmark's terms: every EMA snapshot a training run
left (``testbed/checkpoints/<name>.pt.ema<iteration>.safetensors``) sampled unguided on the
benchmark's noise and scored with the evaluation classifier: class precision, pair accuracy,
k-NN precision / recall, FD; with the targets of the paper's regime drawn in. ``python -m
comfyui_gfcg train --curve`` writes ``training_curve.{json,md,png}``."""
from __future__ import annotations

import glob
import os
import re
from typing import Optional

import torch

from ..classifiers.timm_classifier import load_timm_classifier
from ..edm2.checkpoint import load_edm2
from .bench import Settings, class_rows, reference_features, run_method, score
from .files import FILES, WEIGHTS_DIR
from .models import Testbed
from .train import CHECKPOINT_DIR

# the regime the testbed's main model is trained for (unguided, >= 1000 samples in the benchmark)
TARGETS = {"pair_accuracy": (0.90, None), "precision": (0.50, None), "class_precision": (0.45, 0.80)}


def snapshots(name: str = "main", checkpoint_dir: str = CHECKPOINT_DIR):
    """[(iteration, path)] of the EMA snapshots of run ``name``, in order."""
    out = []
    for p in glob.glob(os.path.join(checkpoint_dir, f"{name}.pt.ema*.safetensors")):
        m = re.search(r"\.ema(\d+)\.safetensors$", p)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


@torch.no_grad()
def training_curve(name: str = "main", n_per_class: int = 20, seed: int = 0, checkpoint_dir: str = CHECKPOINT_DIR,
                   weights_dir: str = WEIGHTS_DIR, settings: Optional[Settings] = None, progress=print,
                   earlier: Optional[dict] = None) -> dict:
    """Rows for every snapshot on disk; ``earlier`` (a previous result of this function on the same
    samples and settings) keeps its rows for iterations whose snapshots are gone (the checkpoint
    folder is not in git)."""
    settings = settings or Settings()
    dt = getattr(torch, settings.dtype)
    gclf = load_timm_classifier(os.path.join(weights_dir, FILES["guidance_classifier"]))
    eclf = load_timm_classifier(os.path.join(weights_dir, FILES["eval_classifier"]))
    desired = class_rows(n_per_class)
    rows, real = [], None
    for it, path in snapshots(name, checkpoint_dir):
        net, _ = load_edm2(path, dt)
        tb = Testbed(net.requires_grad_(False), net, gclf, eclf)
        if real is None:
            real = reference_features(tb, 5000)
        out = run_method(tb, "none", desired, settings, seed)
        s = score(tb, out["images"], desired, real)
        s.pop("hits")
        rows.append({"iteration": it, **s})
        progress(f"{name} ema{it}: class precision {s['class_precision']:.3f}, pair accuracy "
                 f"{s['pair_accuracy']:.3f}, k-NN precision {s['precision']:.3f}")
    if earlier and (earlier.get("model"), earlier.get("n_per_class"), earlier.get("seed"), earlier.get("settings")) \
            == (name, n_per_class, seed, settings.as_dict()):
        have = {r["iteration"] for r in rows}
        rows = sorted(rows + [r for r in earlier["rows"] if r["iteration"] not in have], key=lambda r: r["iteration"])
    return {"model": name, "n_per_class": n_per_class, "seed": seed, "settings": settings.as_dict(),
            "targets": TARGETS, "rows": rows}


def curve_markdown(res: dict) -> str:
    lines = [f"Unguided samples of the `{res['model']}` run's EMA snapshots, {10 * res['n_per_class']} per snapshot "
             f"(noise seeds {res['seed']}+), {res['settings']['steps']} Heun steps; targets: pair accuracy >= 0.90, "
             "k-NN precision >= 0.50, class precision 0.45 to 0.80.", "",
             "| iteration | class precision | pair accuracy | k-NN precision | recall | FD |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        lines.append(f"| {r['iteration']} | {r['class_precision']:.3f} | {r['pair_accuracy']:.3f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['fd']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_curve(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in res["rows"]]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key, label, color in (("pair_accuracy", "pair accuracy", "tab:green"),
                              ("class_precision", "class precision", "tab:blue"),
                              ("precision", "k-NN precision", "tab:orange")):
        ax.plot(its, [r[key] for r in res["rows"]], "o-", color=color, label=label)
    ax.axhline(0.90, color="tab:green", ls=":", lw=1)
    ax.axhline(0.50, color="tab:orange", ls=":", lw=1)
    ax.axhspan(0.45, 0.80, color="tab:blue", alpha=0.08, label="class precision target")
    from .train import RECIPES
    r = RECIPES.get(res["model"])
    if r is not None and getattr(r, "label_noise", 0) > 0:
        ax.axvline(r.label_noise_from, color="grey", ls="--", lw=1)
        ax.annotate(f"label noise {r.label_noise:g} from here", (r.label_noise_from, 0.05), fontsize=7,
                    xytext=(4, 0), textcoords="offset points", color="grey")
    ax.set_xlabel("training iteration (batch 64)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("main model, unguided: the regime targets (dotted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
