"""Host reads in the step loop, counted on the CPU (testbed/host_reads.py): what a CUDA run would
synchronise on. The shipped GFCG + autoguidance reads the device once per classifier decision and
otherwise as often as plain autoguidance; rows are never copied off the device for a host-side cond."""
import logging

import pytest
import torch

from comfyui_gfcg.testbed.host_reads import HostReads


# ------------------------------------------------------------------ the counter itself
def test_the_counter_sees_each_kind_of_read_and_nothing_else():
    x = torch.randn(6)
    m = x > 0
    index = torch.tensor([0, 2])
    with HostReads() as h:
        y = x * 2 + 1                                  # device work: no read
        _ = torch.where(m, x, y).sum()
        _ = x[index]                                   # an index tensor: no read
    assert h.total == 0 and not h.uploads
    with HostReads() as h:
        bool(m.any())                                  # 1: a Python bool
        float(x[0])                                    # 2: a Python float
        m.nonzero()                                    # 3: size from the data
        x[m]                                           # 4: boolean mask
        x[m] = 0.0                                     # 5: boolean mask, written
        torch.unique_consecutive(x)                    # 6
        x.tolist()                                     # 7: a copy to the host
        torch.equal(x, x)                              # 8
    assert h.total == 8, h.top()
    with torch.inference_mode(), HostReads() as h:     # composites reach the mode undecomposed there
        float(x[0])
        bool(m[0])
        int(torch.tensor([3])[0])
    assert h.total == 3, h.top()
    assert sum(h.uploads.values()) == 1                # torch.tensor from Python data: counted apart


def test_reads_are_charged_to_the_calling_line():
    from comfyui_gfcg.guiders import core

    with HostReads() as h:
        core.Decision(omega=torch.ones(2), reference=torch.zeros(2, dtype=torch.long),
                      confused=torch.tensor([True, False]), p_des=torch.ones(2)).host()
    (where, n), = h.top().items()
    assert n == 1 and where.startswith("guiders/core.py:") and h.by_owner() == {"pack": 1}


# ------------------------------------------------------------------ the step loop through ComfyUI
@pytest.mark.comfy
def test_shipped_gfcg_atg_reads_once_per_decision_beyond_autoguidance(env):
    """The latent perf setting (tiny EDM2 main and guide, TAESD / the VAE, ResNet-50, random weights:
    every sample confused on every classifier step, nothing settles), batch 2. Reads that a run makes
    once (checks, the schedule, loading TAESD) cancel in the difference between 4 and 2 steps; what
    is left is two Heun steps (4 evaluations) with one classifier step (period 2)."""
    from comfyui_gfcg.testbed import perf_latent as L

    cfg = L.LatentPerfConfig(batch=2, steps=2, reps=1, main="tiny", guide="tiny")
    e = L.build(cfg)
    try:
        marginal = {}
        for label in ("ATG", "GFCG+ATG shipped, TAESD present", "GFCG+ATG shipped, no TAESD (full VAE)"):
            counts = []
            for steps in (2, 4):
                with HostReads() as h:
                    L.run_row(e, label, L.LatentPerfConfig(**{**cfg.__dict__, "steps": steps}))
                pack = h.by_owner().get("pack", 0)       # reads on the pack's own lines
                counts.append((pack, h.total - pack, h.top(20)))
            marginal[label] = (counts[1][0] - counts[0][0], counts[1][1] - counts[0][1], counts[1][2])
    finally:
        L.close(e)
    pack_atg, other_atg, top = marginal["ATG"]
    assert pack_atg == 4, top            # the sigma of each evaluation, as ComfyUI's own sampler reads it
    for label in ("GFCG+ATG shipped, TAESD present", "GFCG+ATG shipped, no TAESD (full VAE)"):
        pack, other, top = marginal[label]
        assert pack == pack_atg + 1, (label, top)   # + the decision's one read; nothing per evaluation
        assert other == other_atg, (label, top)     # ComfyUI's and torch's reads as ATG's


@pytest.mark.comfy
def test_row_subsets_of_a_host_side_cond_use_the_rows_the_host_knows(env):
    """A cond ComfyUI keeps on the CPU, rows on the device: indexing it must not copy the rows off the
    device. The device here is ``meta``, which cannot be copied off at all."""
    import comfy.conds

    from comfyui_gfcg.guiders.comfy_forward import _index_on, _rows_of_cond

    cond = comfy.conds.CONDRegular(torch.arange(8.0).view(4, 2))
    rows = torch.tensor([1, 3], device="meta")
    got = _rows_of_cond(cond, rows, 4, host_rows=[1, 3]).cond
    assert got.tolist() == [[2.0, 3.0], [6.0, 7.0]]
    with pytest.raises(Exception):
        _rows_of_cond(cond, rows, 4)                      # what it did before: a copy off the device
    same = torch.tensor([0, 2])
    assert _index_on(same, "cpu", [5]) is same            # already there: as it is


class NaNLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return torch.full((x.shape[0], 10), float("nan")) + self.w


class NaNPixels:
    method = "vae"

    def __call__(self, model, x0):
        return torch.full((x0.shape[0], 3, 16, 16), float("nan"))


@pytest.mark.comfy
@pytest.mark.parametrize("broken", ["classifier", "decode"])
def test_a_nan_decision_is_reported_once_naming_its_cause(env, caplog, broken):
    from conftest import node, sample

    from comfyui_gfcg.classifiers.comfy_classifier import ComfyClassifier
    from comfyui_gfcg.classifiers.timm_classifier import DataConfig, ImageClassifier

    cm = env["cm"]
    m, _ = cm.tiny_model()
    clf = env["clf"] if broken == "decode" else ComfyClassifier(
        ImageClassifier(NaNLogits(), DataConfig(input_size=(3, 16, 16), crop_pct=1.0), [f"c{i}" for i in range(10)]))
    g = node(env, "GFCGGuider", model=m, positive=cm.label_cond(3), classifier=clf, desired_class="3", tau=0.5,
             alpha=2.0, beta=1.0, window_start=0.0, window_end=1.0, period=1, reference="deterministic")
    if broken == "decode":
        g.decoder = NaNPixels()
    with caplog.at_level(logging.WARNING, logger="comfyui_gfcg"):
        sample(g, steps=3, batch=2)
    said = [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith("decode:" if broken == "decode" else "classifier:"), said
    assert all(all(p != p for p in e.p_des) and e.reference == [-1, -1] for e in g.engine.trace)  # left alone
