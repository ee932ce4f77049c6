"""The cost benchmark's counters (``bench --perf``) on a tiny run: what it counts is what the
engine does (no timing is asserted; timings are the benchmark's job)."""
import pytest

from comfyui_gfcg.testbed import perf as P
from comfyui_gfcg.testbed.bench import Settings


@pytest.fixture(scope="module")
def result():
    cfg = P.PerfConfig(n=4, reps=1, settings=Settings(steps=3, dtype="float32"), memory=False, decode=False)
    return P.run(cfg, progress=lambda line: None)


def test_counts_per_method(result):
    rows = {r["row"]: r for r in result["rows"]}
    ev = result["evaluations_per_run"]
    assert ev == 5
    assert rows["none"]["nfe"] == ev and rows["none"]["forwards_per_eval"] == 1
    assert rows["CFG"]["nfe"] == 2 * ev and rows["CFG"]["forwards_per_eval"] == 1      # one batched forward
    assert rows["ATG"]["nfe"] == 2 * ev and rows["ATG"]["guide_forwards_per_eval"] == 1
    for r in ("GFCG+CFG swap", "GFCG+ATG swap", "GFCG+ATG shipped"):                    # swap: the base's cost
        assert rows[r]["nfe"] == 2 * ev
    # the shipped schedule classifies fewer rows than every step (period 2: steps 0 and 2 of 3)
    assert rows["GFCG+ATG shipped"]["classifier_rows_per_image"] < rows["GFCG+ATG swap"]["classifier_rows_per_image"]
    assert rows["GFCG+ATG swap"]["main_forwards_per_eval"] == 1
    assert rows["GFCG, classify previous"]["classifier_rows_per_image"] == rows["GFCG"]["classifier_rows_per_image"] == 3
    assert rows["CG (EluCD)"]["classifier_rows_per_image"] == ev                        # a gradient per evaluation
    for r in ("GFCG", "GFCG+CFG additive", "GFCG+ATG additive"):
        assert rows[r]["nfe"] > rows["none" if r == "GFCG" else r.split("+")[1].split()[0]]["nfe"] - 1e-9


def test_targets_and_table(result):
    t = {(x["row"], x["measure"]): x for x in result["targets"]}
    assert t[("GFCG", "nfe")]["met"] and t[("GFCG+CFG swap", "nfe")]["met"] and t[("GFCG+ATG swap", "nfe")]["met"]
    assert t[("GFCG+CFG additive", "nfe")]["ratio"] <= 1.5 and t[("GFCG+ATG additive", "nfe")]["ratio"] <= 1.5
    md = P.markdown(result)
    assert md.count("\n| ") >= len(P.ROWS) + len(P.TARGETS)
    assert "of a denoiser evaluation" in md
