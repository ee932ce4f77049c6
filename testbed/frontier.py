"""The precision-FD frontier of every guidance family on the testbed (``bench --frontier``).

Each method is run along its own knob (CFG's and autoguidance's w, GFCG's alpha, the gradient
guidance scale s) at 1000 samples a point on the benchmark's noise (seed 0+, the same for every
point), scored with the evaluation classifier. A point is one JSON file under ``frontier_rows/``
(written when it finishes, skipped when it exists with the same configuration: the run resumes),
so two processes (``--shard 0/2``, ``--shard 1/2``) can share a 2-core machine.

The comparison a frontier allows: a GFCG point against its base method AT THE SAME FD. The base's
precision at an FD f is the best precision its knob reaches at an FD no worse than f, read along
its frontier (vertices in knob order, linear between neighbours). Because every point starts from
the same noises, the comparison is paired: sample i's hit of the GFCG point against the same
convex combination of sample i's hits at the two base vertices (``matched_difference``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .bench import Settings, class_rows, eval_outputs, reference_features, run_method
from .dataset import NUM_CLASSES, PAIR_OF
from .metrics import class_precision, frechet_distance, pair_accuracy, precision_recall

N_PER_CLASS = 100           # 1000 samples a point, the benchmark's count
SEED = 0                    # the benchmark's noise
N_REAL = 5000
Z99 = 2.326                 # one-sided 99 %
ROWS_DIR = os.path.join("testbed", "results", "frontier_rows")

# the schedule the autoguidance workflows ship (bench.SHIPPED_ATG): every 2nd step, settle after 4
SHIPPED_SCHEDULE = {"period": 2, "settle_after": 4}
# the alpha GFCG alone and on CFG ship with (the node default), chosen by this frontier (was 4)
SHIPPED_ALPHA = 8.0


def frontier_base() -> Settings:
    """The settings every point starts from: the benchmark's sampler, with GFCG's alpha pinned at 4
    (the node default when the frontier ran; the frontier itself moved the default to 8). Every
    GFCG point sets its own alpha, so the pin only keeps the stored points' configurations equal."""
    return dataclasses.replace(Settings(), gfcg=dataclasses.replace(Settings().gfcg, alpha=4.0))


@dataclass(frozen=True)
class Point:
    """One point of a family's frontier: ``method`` with Settings / GFCGConfig overrides; ``value`` of
    the family's knob; ``n_per_class`` 200 for the two points that also give FD at 2000 samples."""

    family: str
    value: float
    method: str
    settings: Tuple = ()            # (name, value) pairs: Settings overrides
    gfcg: Tuple = ()                # (name, value) pairs: GFCGConfig overrides
    n_per_class: int = N_PER_CLASS
    shipped: bool = False           # the setting the nodes and workflows ship now
    former: bool = False            # the setting they shipped before this frontier

    @property
    def name(self) -> str:
        return f"{self.family} {FAMILIES[self.family]['knob']}={self.value:g}"

    @property
    def slug(self) -> str:
        s = "".join(c if c.isalnum() or c in ".=" else "_" for c in self.name)
        return s.replace("=", "-")

    def resolved(self, base: Optional[Settings] = None) -> Settings:
        base = base or frontier_base()
        over = dict(self.settings)
        if "cg_scale" in over:
            over["cg"] = dataclasses.replace(base.cg, scale=over.pop("cg_scale"))
        return dataclasses.replace(base, **over, gfcg=dataclasses.replace(base.gfcg, **dict(self.gfcg)))

    def config(self) -> dict:
        """What the result depends on (a stored row is reused only if this is equal)."""
        return {"method": self.method, "settings": self.resolved().as_dict(), "n_per_class": self.n_per_class,
                "seed": SEED, "n_real": N_REAL}

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()[:16]


# family -> its knob and its plot style (the bases each is compared with at equal FD: ANSWERS)
FAMILIES: Dict[str, dict] = {
    "CFG": {"knob": "w", "color": "tab:gray", "style": "--"},
    "ATG": {"knob": "w", "color": "black", "style": "--"},
    "GFCG": {"knob": "alpha", "color": "tab:blue", "style": "-"},
    "GFCG (period 2, settle 4)": {"knob": "alpha", "color": "tab:cyan", "style": ":"},
    "GFCG+CFG additive": {"knob": "alpha", "color": "tab:green", "style": "-"},
    "GFCG+CFG swap": {"knob": "alpha", "color": "tab:olive", "style": ":"},
    "GFCG+ATG swap sum, every step": {"knob": "alpha", "color": "tab:red", "style": ":"},
    "GFCG+ATG swap sum, shipped schedule": {"knob": "alpha", "color": "tab:red", "style": "-"},
    "GFCG+ATG swap max": {"knob": "alpha", "color": "tab:pink", "style": ":"},
    "GFCG+ATG swap max, shipped schedule": {"knob": "alpha", "color": "tab:pink", "style": "-"},
    "GFCG+ATG swap omega": {"knob": "alpha", "color": "tab:brown", "style": ":"},
    "GFCG+ATG swap base": {"knob": "tau", "color": "tab:purple", "style": ":"},
    "CG (EluCD)": {"knob": "s", "color": "tab:orange", "style": "-"},
    "CG+CFG": {"knob": "s", "color": "gold", "style": ":"},
    "CG+ATG": {"knob": "s", "color": "peru", "style": ":"},
}

# the four questions: (GFCG family, base family); then gradient guidance on the same bases
ANSWERS = (("GFCG", "CFG"), ("GFCG+CFG additive", "CFG"), ("GFCG+ATG swap sum, shipped schedule", "ATG"),
           ("GFCG", "CG (EluCD)"), ("GFCG+CFG additive", "CG+CFG"), ("GFCG+ATG swap sum, shipped schedule", "CG+ATG"))


def points() -> List[Point]:
    """Every point, most important first (the bases and the shipped settings), so that a run cut
    short still answers the main questions."""
    sw = (("mode", "swap"),)
    ship = tuple(SHIPPED_SCHEDULE.items())
    p = [Point("CFG", 1.0, "none"), Point("ATG", 2.0, "atg", (("atg_scale", 2.0),), n_per_class=200),
         Point("GFCG+ATG swap sum, shipped schedule", 4.0, "gfcg+atg", sw, (("alpha", 4.0),) + ship,
               n_per_class=200, shipped=True),
         Point("CFG", 2.0, "cfg", (("cfg_scale", 2.0),)),
         Point("GFCG", 4.0, "gfcg", (), (("alpha", 4.0),), former=True),
         Point("GFCG+CFG additive", 4.0, "gfcg+cfg", (("mode", "additive"),), (("alpha", 4.0),), former=True)]
    p += [Point("ATG", w, "atg", (("atg_scale", w),)) for w in (1.5, 3.0, 4.0, 6.0)]
    p += [Point("CFG", w, "cfg", (("cfg_scale", w),)) for w in (1.5, 3.0, 4.0, 6.0)]
    p += [Point("GFCG+ATG swap sum, shipped schedule", a, "gfcg+atg", sw, (("alpha", a),) + ship) for a in (2.0, 8.0, 16.0)]
    p += [Point("GFCG", a, "gfcg", (), (("alpha", a),), shipped=a == SHIPPED_ALPHA) for a in (1.0, 2.0, 8.0, 16.0)]
    p += [Point("GFCG+CFG additive", a, "gfcg+cfg", (("mode", "additive"),), (("alpha", a),), shipped=a == SHIPPED_ALPHA)
          for a in (1.0, 2.0, 8.0)]
    p += [Point("CG (EluCD)", s, "cg", (("cg_scale", s),)) for s in (0.004, 0.01, 0.02, 0.04, 0.08)]
    p += [Point("GFCG+ATG swap sum, every step", a, "gfcg+atg", sw, (("alpha", a),)) for a in (1.0, 2.0, 4.0, 8.0, 16.0)]
    p += [Point("GFCG (period 2, settle 4)", a, "gfcg", (), (("alpha", a),) + ship) for a in (4.0, 8.0, 16.0)]
    p += [Point("GFCG+CFG swap", a, "gfcg+cfg", sw, (("alpha", a),)) for a in (2.0, 4.0, 8.0)]
    p += [Point("GFCG+ATG swap base", t, "gfcg+atg", sw, (("swap_rule", "base"), ("tau", t))) for t in (0.5, 0.9)]
    p += [Point("GFCG+ATG swap max", a, "gfcg+atg", sw, (("swap_rule", "max"), ("alpha", a))) for a in (4.0, 8.0)]
    p += [Point("GFCG+ATG swap omega", a, "gfcg+atg", sw, (("swap_rule", "omega"), ("alpha", a))) for a in (2.0, 4.0)]
    p += [Point("CG+CFG", s, "cg+cfg", (("cg_scale", s),)) for s in (0.01, 0.02, 0.04)]
    p += [Point("CG+ATG", s, "cg+atg", (("cg_scale", s),)) for s in (0.01, 0.02, 0.04)]
    # the baselines' low-w end, where their FD is lowest (added after the first points ran)
    p += [Point("CFG", w, "cfg", (("cfg_scale", w),)) for w in (1.25, 1.75)]
    p += [Point("ATG", w, "atg", (("atg_scale", w),)) for w in (1.25, 2.5)]
    # GFCG's alpha further, where precision was still rising at the largest alpha run
    p += [Point("GFCG", 32.0, "gfcg", (), (("alpha", 32.0),)),
          Point("GFCG+CFG additive", 16.0, "gfcg+cfg", (("mode", "additive"),), (("alpha", 16.0),))]
    # the max rule (more precise than sum at the shipped FD, every step) at the shipped schedule's cost
    p += [Point("GFCG+ATG swap max, shipped schedule", 8.0, "gfcg+atg", sw, (("swap_rule", "max"), ("alpha", 8.0)) + ship)]
    return p


def family_points(rows: Sequence[dict], family: str) -> List[dict]:
    """A family's stored rows in knob order; unguided sampling is CFG's and ATG's w = 1."""
    out = [r for r in rows if r["family"] == family]
    if family == "ATG":
        out += [dict(r, family="ATG", name="ATG w=1 (unguided)") for r in rows if r["method"] == "none"]
    return sorted(out, key=lambda r: r["value"])


# --------------------------------------------------------------------------------------------------
# Running


def hits_string(hits: torch.Tensor) -> str:
    return "".join("1" if bool(h) else "0" for h in hits.flatten().tolist())


def hits_tensor(s: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in s], dtype=torch.float64)


def run_point(tb, pt: Point, real: torch.Tensor) -> dict:
    """Sample and score one point; with 2000 samples, the scores are those of the first 1000 (the
    same noises as every other point) and ``fd_2000`` is FD over all of them."""
    st = pt.resolved()
    desired = class_rows(pt.n_per_class)
    out = run_method(tb, pt.method, desired, st, SEED)
    logits, feats = eval_outputs(tb, out["images"])
    n = N_PER_CLASS * NUM_CLASSES
    hits = logits[:n].argmax(1) == desired[:n]
    pr, rc = precision_recall(real[:n], feats[:n], 3)
    row = {"family": pt.family, "name": pt.name, "value": pt.value, "method": pt.method, "shipped": pt.shipped,
           "config": pt.config(), "config_hash": pt.config_hash(),
           "class_precision": class_precision(logits[:n], desired[:n]),
           "pair_accuracy": pair_accuracy(logits[:n], desired[:n], PAIR_OF),
           "fd": frechet_distance(feats[:n], real), "precision": pr, "recall": rc,
           "nfe": out["nfe"], "classifier_rows": out["classifier_rows"],
           "seconds_per_image": out["seconds"] / desired.shape[0], "threads": torch.get_num_threads(),
           "hits": hits_string(hits)}
    if desired.shape[0] > n:
        row["fd_2000"] = frechet_distance(feats, real)
        row["n_sampled"] = int(desired.shape[0])
    return row


def stored(pt: Point, rows_dir: str = ROWS_DIR) -> Optional[dict]:
    path = os.path.join(rows_dir, pt.slug + ".json")
    if not os.path.exists(path):
        return None
    row = json.load(open(path))
    return row if row.get("config_hash") == pt.config_hash() else None


def run(shard: Tuple[int, int] = (0, 1), rows_dir: str = ROWS_DIR, only: Optional[Sequence[str]] = None,
        progress=print) -> List[dict]:
    """Run this shard's missing points (point i belongs to shard i mod k), each written when done."""
    from .models import load_testbed

    todo = [p for i, p in enumerate(points()) if i % shard[1] == shard[0] and (not only or p.name in only)]
    todo = [p for p in todo if stored(p, rows_dir) is None]
    progress(f"frontier: shard {shard[0]}/{shard[1]}, {len(todo)} point(s) to run")
    if not todo:
        return []
    tb = load_testbed(Settings().dtype)
    real = reference_features(tb, N_REAL)
    os.makedirs(rows_dir, exist_ok=True)
    done = []
    for pt in todo:
        t0 = time.time()
        row = run_point(tb, pt, real)
        _write_row(row, pt, rows_dir)
        done.append(row)
        progress(f"frontier: {pt.name}: class precision {row['class_precision']:.3f}, FD {row['fd']:.2f} "
                 f"({time.time() - t0:.0f} s)")
    return done


def time_points(shard: Tuple[int, int] = (0, 1), rows_dir: str = ROWS_DIR, n_per_class: int = 10,
                progress=print) -> None:
    """Wall time per image of every stored point of this shard, measured again on one batch of
    ``10 n_per_class`` samples (seed 0) with nothing else running on the machine, into the row as
    ``timed_seconds_per_image`` (the frontier run's own times share the CPU with whatever ran then)."""
    from .models import load_testbed

    tb = load_testbed(Settings().dtype)
    desired = class_rows(n_per_class)
    for i, pt in enumerate(points()):
        row = stored(pt, rows_dir) if i % shard[1] == shard[0] else None
        if row is None or "timed_seconds_per_image" in row:
            continue
        out = run_method(tb, pt.method, desired, pt.resolved(), SEED, batch=desired.shape[0])
        row["timed_seconds_per_image"] = out["seconds"] / desired.shape[0]
        row["timed_threads"] = torch.get_num_threads()
        _write_row(row, pt, rows_dir)
        progress(f"frontier timing: {pt.name}: {1000 * row['timed_seconds_per_image']:.1f} ms / image")


def _write_row(row: dict, pt: Point, rows_dir: str) -> None:
    tmp = os.path.join(rows_dir, pt.slug + ".json.tmp")
    with open(tmp, "w") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, os.path.join(rows_dir, pt.slug + ".json"))


def seconds_per_image(row: dict) -> float:
    """The quiet re-timing where there is one, else the frontier run's own time."""
    return row.get("timed_seconds_per_image", row["seconds_per_image"])


def load_rows(rows_dir: str = ROWS_DIR) -> List[dict]:
    """The stored rows of the current points, in ``points()`` order (missing ones left out), with
    their roles as the points say now (shipped, formerly shipped)."""
    out = []
    for p in points():
        r = stored(p, rows_dir)
        if r is not None:
            out.append(dict(r, shipped=p.shipped, former=p.former))
    return out


# --------------------------------------------------------------------------------------------------
# Matching at equal FD


@dataclass
class Match:
    """A point against its base family at the point's FD."""

    point: str
    base: str                 # the base's vertices used, e.g. "ATG w=2 .. ATG w=3 at t 0.40"
    base_precision: float
    gain: float
    lower99: float
    upper99: float
    reachable: bool           # False: the base never gets down to this FD; compared with its lowest-FD point
    vertices: List[Tuple[str, float]]   # (base point name, weight of its hits) of the comparison


def envelope(base_rows: Sequence[dict], fd: float) -> Optional[tuple]:
    """The base family's best precision at FD <= ``fd`` along its frontier (vertices in knob order,
    linear between neighbours): (precision, description, per-sample hit weights, [(vertex, weight)])."""
    best = None

    def consider(prec, desc, h, vertices):
        nonlocal best
        if best is None or prec > best[0]:
            best = (prec, desc, h, vertices)

    for r in base_rows:
        if r["fd"] <= fd:
            consider(r["class_precision"], r["name"], hits_tensor(r["hits"]), [(r["name"], 1.0)])
    for a, b in zip(base_rows, base_rows[1:]):
        lo, hi = sorted((a["fd"], b["fd"]))
        if lo < fd < hi:    # the segment crosses fd: the point on it at fd exactly
            t = (fd - a["fd"]) / (b["fd"] - a["fd"])
            h = (1 - t) * hits_tensor(a["hits"]) + t * hits_tensor(b["hits"])
            consider(float(h.mean()), f"{a['name']} .. {b['name']} at t {t:.2f}", h,
                     [(a["name"], 1 - t), (b["name"], t)])
    return best


def matched_difference(row: dict, base_rows: Sequence[dict]) -> Match:
    """Paired precision gain of ``row`` over its base at the row's FD (``envelope``), with the
    one-sided 99 % bounds mean(d) -/+ 2.326 sd(d) / sqrt(n), d_i = hit_i - base hit weight_i."""
    env = envelope(base_rows, row["fd"])
    reachable = env is not None
    if not reachable:   # the base's lowest FD is above this point's: compare with that point
        r = min(base_rows, key=lambda r: r["fd"])
        env = (r["class_precision"], r["name"] + " (the base's lowest FD)", hits_tensor(r["hits"]), [(r["name"], 1.0)])
    mean, lo, hi = paired_bounds(hits_tensor(row["hits"]), env[2])
    return Match(row["name"], env[1], env[0], mean, lo, hi, reachable, env[3])


def paired_bounds(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float, float]:
    """mean(a - b) and its one-sided 99 % bounds mean -/+ 2.326 sd / sqrt(n) over paired samples."""
    d = a.double() - b.double()
    mean, half = float(d.mean()), Z99 * float(d.std(unbiased=True)) / math.sqrt(d.numel())
    return mean, mean - half, mean + half


def answers(rows: Sequence[dict]) -> List[dict]:
    """For each of the four questions: every point of the GFCG family against the base at its FD."""
    out = []
    for fam, base in ANSWERS:
        base_rows = family_points(rows, base)
        pts = family_points(rows, fam)
        if not base_rows or not pts:
            continue
        out.append({"family": fam, "base": base,
                    "points": [dict(dataclasses.asdict(matched_difference(r, base_rows)), fd=r["fd"],
                                    shipped=r["shipped"], former=r.get("former", False)) for r in pts]})
    return out


def verdict(ans: dict) -> str:
    """One sentence from a question's matches."""
    wins = [p for p in ans["points"] if p["lower99"] > 0]
    parts = []
    for role, key in (("shipped", "shipped"), ("shipped before", "former")):
        p = next((p for p in ans["points"] if p.get(key)), None)
        if p:
            parts.append(f"{role} {p['point']}: {p['gain']:+.3f} [{p['lower99']:+.3f}, {p['upper99']:+.3f}]"
                         f" against {p['base']}")
    losses = [p for p in ans["points"] if p["upper99"] < 0]
    if losses and wins:
        parts.append(f"{len(losses)} below it at 99 %")
    if wins:
        parts.append(f"{len(wins)} of {len(ans['points'])} points above the {ans['base']} frontier at 99 %")
    elif losses:
        parts.append(f"no point above the {ans['base']} frontier; {len(losses)} below it at 99 %")
    else:
        parts.append(f"no point separates from the {ans['base']} frontier at 99 %: it trades along it")
    return "; ".join(parts)


def default_checks(rows: Sequence[dict], fd_margin: float = 0.1, precision_margin: float = 0.02) -> List[dict]:
    """Does any point of the same method dominate a shipped setting? For each shipped point S and each
    other point C of S's method: C - S in class precision (paired bounds), FD and cost. C dominates
    when it is more precise at 99 % at an FD no worse, or when it is as precise (its 99 % lower bound
    on C - S above -``precision_margin``) at an FD lower by more than ``fd_margin`` (relative) with no
    more classifier rows per image (5 % slack: settling makes the count vary a little)."""
    out = []
    for s in (r for r in rows if r["shipped"] or r.get("former")):
        hs = hits_tensor(s["hits"])
        cands = []
        for c in rows:
            if c is s or c["method"] != s["method"]:
                continue
            mean, lo, hi = paired_bounds(hits_tensor(c["hits"]), hs)
            more = lo > 0 and c["fd"] <= s["fd"]
            lower_fd = (lo > -precision_margin and c["fd"] < (1 - fd_margin) * s["fd"]
                        and c["classifier_rows"] <= 1.05 * s["classifier_rows"])
            cands.append({"point": c["name"], "gain": mean, "lower99": lo, "upper99": hi, "fd": c["fd"],
                          "classifier_rows": c["classifier_rows"], "seconds_per_image": seconds_per_image(c),
                          "more_precise_at_no_worse_fd": bool(more), "lower_fd_at_same_precision": bool(lower_fd)})
        out.append({"shipped": s["name"], "role": "shipped" if s["shipped"] else "formerly shipped",
                    "fd": s["fd"], "class_precision": s["class_precision"],
                    "classifier_rows": s["classifier_rows"], "candidates": cands})
    return out


# --------------------------------------------------------------------------------------------------
# Report


def report(rows: Sequence[dict]) -> dict:
    """frontier.json's content: the rows (with their hits, for paired checks), the answers."""
    return {"n_per_point": N_PER_CLASS * NUM_CLASSES, "seed": SEED, "n_real": N_REAL,
            "base_settings": frontier_base().as_dict(), "torch": torch.__version__,
            "points_total": len(points()), "rows": list(rows), "answers": answers(rows),
            "default_checks": default_checks(rows)}


def markdown(res: dict) -> str:
    lines = ["| family | knob | class precision | FD | k-NN precision | recall | NFE / image | classifier rows "
             "/ image | ms / image |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fams = list(FAMILIES)
    for r in sorted(res["rows"], key=lambda r: (fams.index(r["family"]), r["value"])):
        knob = f"{FAMILIES[r['family']]['knob']} {r['value']:g}" + (" (shipped)" if r["shipped"] else "") + \
            (" (shipped before)" if r.get("former") else "")
        if r["method"] == "none":
            knob += " (unguided)"
        lines.append(f"| {r['family']} | {knob} | {r['class_precision']:.3f} | {r['fd']:.2f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['nfe']:.1f} | {r['classifier_rows']:.1f} | "
                     f"{1000 * seconds_per_image(r):.0f} |")
    n = res["n_per_point"]
    lines += ["", f"FD's bias with the sample count: every point has {n} samples; two were sampled further "
              f"(the first {n} are the table's):", ""]
    lines += [f"- {r['name']}: {r['fd']:.3f} at {n}, {r['fd_2000']:.3f} at {r['n_sampled']}"
              for r in res["rows"] if "fd_2000" in r]
    lines += ["", "Against the base at equal FD (paired over 1000 shared noises; gain [one-sided 99 % lower, "
              "upper]):", ""]
    for a in res["answers"]:
        lines += [f"**{a['family']} vs {a['base']}**: {verdict(a)}", ""]
        for p in a["points"]:
            lines.append(f"- {p['point']} (FD {p['fd']:.2f}): {p['gain']:+.3f} [{p['lower99']:+.3f}, "
                         f"{p['upper99']:+.3f}] against {p['base']} ({p['base_precision']:.3f})"
                         + ("" if p["reachable"] else "; the base does not reach this FD"))
        lines.append("")
    lines += ["Shipped settings against the other settings of the same method (paired over the same noises; "
              "C - shipped [99 % lower, upper]):", ""]
    for chk in res.get("default_checks", []):
        lines.append(f"**{chk['shipped']}**, {chk['role']} (precision {chk['class_precision']:.3f}, FD {chk['fd']:.2f}, "
                     f"{chk['classifier_rows']:.1f} classifier rows / image):")
        lines.append("")
        for c in chk["candidates"]:
            extra = c["classifier_rows"] / max(chk["classifier_rows"], 1e-9)
            flag = ("; **more precise at no worse FD**" + (f" (at {extra:.1f}x the classifier rows)" if extra > 1.05 else "")
                    if c["more_precise_at_no_worse_fd"] else "") + \
                   ("; **as precise at a lower FD, no more classifier work**" if c["lower_fd_at_same_precision"] else "")
            lines.append(f"- {c['point']}: {c['gain']:+.3f} [{c['lower99']:+.3f}, {c['upper99']:+.3f}], FD {c['fd']:.2f}, "
                         f"{c['classifier_rows']:.1f} rows{flag}")
        lines.append("")
    missing = res["points_total"] - len(res["rows"])
    if missing:
        lines.append(f"({missing} of {res['points_total']} points not run yet.)")
    return "\n".join(lines) + "\n"


def interpolate_at(rows: Sequence[dict], fd: float, key: str) -> Optional[Tuple[float, float]]:
    """(precision, key) of a family where its frontier first crosses ``fd`` in knob order, else None:
    the precision interpolated, the cost ``key`` the larger of the two points' (a setting between
    them costs what a guided setting costs: unguided w = 1 is cheaper than any w > 1)."""
    for a, b in zip(rows, rows[1:]):
        lo, hi = sorted((a["fd"], b["fd"]))
        if lo <= fd <= hi and hi > lo:
            t = (fd - a["fd"]) / (b["fd"] - a["fd"])
            return ((1 - t) * a["class_precision"] + t * b["class_precision"], max(a[key], b[key]))
    return None


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    ax = axes[0]
    for fam, st in FAMILIES.items():
        pts = family_points(rows, fam)
        if not pts:
            continue
        ax.plot([r["fd"] for r in pts], [r["class_precision"] for r in pts], st["style"], marker="o", ms=3.5,
                color=st["color"], label=fam, lw=1.4)
        for r in pts:
            if r["shipped"]:
                ax.plot(r["fd"], r["class_precision"], marker="*", ms=14, color=st["color"], mec="black", zorder=5)
            if r.get("former"):
                ax.plot(r["fd"], r["class_precision"], marker="*", ms=14, mfc="none", mec=st["color"], zorder=5)
        ends = [pts[0], pts[-1]]
        for r in ends:
            ax.annotate(f"{st['knob']} {r['value']:g}", (r["fd"], r["class_precision"]), fontsize=6,
                        xytext=(3, -8), textcoords="offset points", color=st["color"])
    ax.set_xlabel("FD (evaluation-classifier features, 1000 samples), lower is better")
    ax.set_ylabel("class precision (evaluation classifier)")
    ax.set_title("precision against FD, one line per family along its knob (* shipped, hollow * shipped before)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)

    ship = next((r for r in rows if r["shipped"] and r["family"].startswith("GFCG+ATG")), None)
    ax = axes[1]
    targets = ([(ship["fd"], "o")] if ship else []) + [(1.5, "s")]
    for fam, st in FAMILIES.items():
        pts = [dict(r, t=seconds_per_image(r)) for r in family_points(rows, fam)]
        for fd, marker in targets:
            at = interpolate_at(pts, fd, "t") if len(pts) > 1 else None
            if at is None:
                continue
            ax.scatter([1000 * at[1]], [at[0]], color=st["color"], marker=marker, s=45, edgecolors="black",
                       linewidths=0.4)
            ax.annotate(fam, (1000 * at[1], at[0]), fontsize=6, xytext=(4, 2), textcoords="offset points",
                        color=st["color"])
    ax.set_title("at equal FD, read along each frontier that reaches it: "
                 + " and ".join(f"FD {fd:.2f} ({'circles' if m == 'o' else 'squares'})" for fd, m in targets),
                 fontsize=9)
    ax.set_xlabel("wall time per image (ms, CPU, 1 thread)")
    ax.set_ylabel("class precision")
    ax.grid(alpha=0.3)
    fig.suptitle(f"testbed frontier: {res['n_per_point']} samples per point on the same noises (seed {res['seed']}+)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: str = os.path.join("testbed", "results"), rows_dir: str = ROWS_DIR) -> dict:
    """frontier.json, frontier.md and frontier.png from the stored rows."""
    from .report import write_result

    res = report(load_rows(rows_dir))
    write_result(out, "frontier", res, markdown(res))
    if res["rows"]:
        plot(res, os.path.join(out, "frontier.png"))
    return res
