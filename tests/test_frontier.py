"""The frontier's bookkeeping (``testbed.frontier``): the points, the base's precision at a given
FD along its frontier, and the paired bound of a point against it. Synthetic rows, no sampling."""
import math

import pytest
import torch

from comfyui_gfcg.testbed import frontier as F
from comfyui_gfcg.testbed.bench import SHIPPED_ATG, Settings


def row(family, value, fd, hits, method="x", shipped=False):
    return {"family": family, "name": f"{family} {value:g}", "value": value, "method": method, "fd": fd,
            "class_precision": sum(hits) / len(hits), "hits": "".join(map(str, hits)), "shipped": shipped}


def test_points_unique_and_shipped_settings():
    pts = F.points()
    assert len({p.slug for p in pts}) == len(pts) and len({p.config_hash() for p in pts}) == len(pts)
    ship = [p for p in pts if p.shipped and p.method == "gfcg+atg"]
    assert len(ship) == 1
    st = ship[0].resolved()
    assert st.mode == SHIPPED_ATG["mode"]
    assert {k: getattr(st.gfcg, k) for k in SHIPPED_ATG["gfcg"]} == SHIPPED_ATG["gfcg"]
    assert all(p.n_per_class * 10 >= 1000 for p in pts)          # the issue's >= 1000 samples a point
    assert {p.family for p in pts} == set(F.FAMILIES)
    for fam in ("CFG", "ATG"):                                    # at least five values of w besides w = 1
        assert len([p for p in pts if p.family == fam and p.value > 1]) >= 5
    assert Settings().gfcg.alpha in {p.value for p in pts if p.family == "GFCG"}


def test_envelope_interpolates_between_vertices():
    a = row("B", 1.0, 1.0, [1, 0, 0, 0])      # precision 0.25 at FD 1
    b = row("B", 2.0, 3.0, [1, 1, 1, 0])      # precision 0.75 at FD 3
    prec, desc, weights, vertices = F.envelope([a, b], 2.0)       # half way
    assert prec == pytest.approx(0.5) and "t 0.50" in desc
    assert vertices == [("B 1", pytest.approx(0.5)), ("B 2", pytest.approx(0.5))]
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.5, 0.5, 0.0], dtype=torch.float64))
    assert F.envelope([a, b], 0.5) is None                         # below every vertex: unreachable
    assert F.envelope([a, b], 5.0)[0] == pytest.approx(0.75)      # past the last vertex: its precision
    # a frontier that bends back (FD falls again at a higher knob): the best precision at FD <= f counts
    c = row("B", 3.0, 1.5, [1, 1, 1, 1])
    assert F.envelope([a, b, c], 2.0)[0] == pytest.approx(1.0)


def test_matched_difference_is_paired():
    base = [row("B", 1.0, 1.0, [0] * 50 + [1] * 50), row("B", 2.0, 3.0, [1] * 100)]
    pt = row("G", 4.0, 1.0, [1] * 100)
    m = F.matched_difference(pt, base)
    assert m.reachable and m.gain == pytest.approx(0.5)
    d = torch.tensor([0.0] * 50 + [1.0] * 50, dtype=torch.float64)[torch.arange(100).flip(0)]
    half = F.Z99 * float(d.std(unbiased=True)) / math.sqrt(100)
    assert m.lower99 == pytest.approx(0.5 - half) and m.upper99 == pytest.approx(0.5 + half)
    low = F.matched_difference(row("G", 4.0, 0.5, [1] * 100), base)   # FD below the base's lowest
    assert not low.reachable and "lowest FD" in low.base and low.gain == pytest.approx(0.5)


def test_unguided_is_w1_of_both_baselines():
    rows = [row("CFG", 1.0, 1.6, [1, 0], method="none"), row("ATG", 2.0, 0.6, [1, 1]), row("CFG", 2.0, 1.5, [1, 1])]
    atg = F.family_points(rows, "ATG")
    assert [r["value"] for r in atg] == [1.0, 2.0] and atg[0]["name"].startswith("ATG w=1")
    assert [r["value"] for r in F.family_points(rows, "CFG")] == [1.0, 2.0]
