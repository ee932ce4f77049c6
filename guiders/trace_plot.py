"""Pictures and one-line summaries of a guider's trace (framework-free; matplotlib).

GFCG records per classifier step (sigma) each sample's p(c_des), omega and reference class
(``engine.TraceEntry``); the gradient guider records p(c_des) and its weight per evaluation
(``gradient.CGTraceEntry``). ``plot_trace`` draws either; ``progress_line`` is the text the
guider reports while it samples.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

import numpy as np


def _short(name: str, width: int = 18) -> str:
    n = name.split(",")[0].strip()
    return n if len(n) <= width else n[:width - 1] + "…"


def progress_line(entry, n_steps: int, class_names: Sequence[str], tau: float) -> str:
    """'step 3/18  sigma 12.4  confused 2/4  p(desired) 0.21..0.93  reference: tabby cat x2'."""
    p = entry.p_des
    head = f"step {entry.step + 1}/{n_steps}  sigma {entry.sigma:.3g}  p(desired) {min(p):.2f}..{max(p):.2f}"
    refs = [r for r in getattr(entry, "reference", []) if r >= 0]
    if not hasattr(entry, "reference"):
        return head + f"  weight {entry.weight:.3g}"
    if not refs:
        return head + f"  all {len(p)} confident (tau {tau:g})"
    counts = Counter(refs).most_common(3)
    names = ", ".join(f"{_short(class_names[k]) if 0 <= k < len(class_names) else k} x{c}" for k, c in counts)
    return head + f"  confused {len(refs)}/{len(p)}  reference: {names}"


def plot_trace(trace: Sequence, class_names: Sequence[str], desired: Optional[int] = None, tau: Optional[float] = None,
               title: str = "", width_px: int = 1000, height_px: int = 560) -> np.ndarray:
    """The trace as an RGB image [H, W, 3] uint8: p(c_des) per sample over the steps (top) and
    omega -- or the gradient guider's weight -- (bottom); for GFCG each confused point is marked
    with its reference class (the most frequent ones named in the legend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(width_px / dpi, height_px / dpi), dpi=dpi, sharex=True)
    if not trace:
        ax1.text(0.5, 0.5, "no classifier steps were recorded (tau = 0, or the sampler has not run)",
                 ha="center", va="center", transform=ax1.transAxes)
    else:
        steps = [e.step for e in trace]
        sig = [e.sigma for e in trace]
        p = np.array([e.p_des for e in trace])                          # [T, B]
        gfcg = hasattr(trace[0], "reference")
        for b in range(p.shape[1]):
            ax1.plot(steps, p[:, b], marker="o", ms=3, lw=1, label=f"sample {b}")
        if tau is not None and gfcg:
            ax1.axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:g}")
        ax1.set_ylim(-0.02, 1.02)
        name = _short(class_names[desired]) if desired is not None and 0 <= desired < len(class_names) else "desired"
        ax1.set_ylabel(f"p({name})")
        if gfcg:
            om = np.array([e.omega for e in trace])
            ref = np.array([e.reference for e in trace])
            for b in range(om.shape[1]):
                ax2.plot(steps, om[:, b], marker="o", ms=3, lw=1)
            common = [k for k, _ in Counter(ref[ref >= 0].tolist()).most_common(6)]
            markers = "sD^vP*"
            for i, k in enumerate(common):
                t, b = np.nonzero(ref == k)
                label = _short(class_names[k]) if 0 <= k < len(class_names) else str(k)
                ax2.scatter(np.array(steps)[t], om[t, b], marker=markers[i], s=40, facecolors="none",
                            edgecolors=f"C{i}", label=f"reference: {label}")
            ax2.set_ylabel("omega (1 = no guidance)")
            if common:
                ax2.legend(fontsize=7, loc="upper right")
        else:
            ax2.plot(steps, [e.weight for e in trace], marker="o", ms=3, color="k")
            ax2.set_ylabel("weight w_i")
        ax2.set_xlabel("step (sigma below)")
        ticks = steps[:: max(1, len(steps) // 12)]
        ax2.set_xticks(ticks)
        ax2.set_xticklabels([f"{s}\n{sig[steps.index(s)]:.3g}" for s in ticks], fontsize=7)
        if p.shape[1] <= 8:
            ax1.legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle(title or "guidance trace", fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img
