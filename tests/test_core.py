"""The framework-free GFCG core: decision rule, scale, references, combinations, schedule, engine."""
import subprocess
import sys

import pytest
import torch

from comfyui_gfcg.guiders import core
from comfyui_gfcg.guiders.config import GFCGConfig, GFCGInputError
from comfyui_gfcg.guiders.engine import GFCGEngine
from comfyui_gfcg.guiders.schedule import GFCGSchedule, classifier_steps, step_index


def probs_of(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_core_imports_without_comfyui():
    code = ("import sys, comfyui_gfcg.guiders, comfyui_gfcg.classifiers;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('comfy','folder_paths','comfy_api')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ decision
def test_scale_formula_hand_computed():
    p = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9])
    om = core.gfcg_scale(p, tau=0.5, alpha=2.0, beta=2.0)
    expected = [1 + 2 * 1.0 ** 2, 1 + 2 * 0.8 ** 2, 1 + 2 * 0.5 ** 2, 1.0, 1.0]
    assert torch.allclose(om, torch.tensor(expected))


def test_tau_zero_never_confused_and_no_division():
    p = torch.tensor([0.0, 0.3])
    assert not core.confused_mask(p, 0.0).any()
    assert torch.equal(core.gfcg_scale(p, 0.0, 3.0, 1.0), torch.ones(2))


def test_decision_per_sample_deterministic():
    probs = probs_of([[0.1, 0.6, 0.3], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    d = core.decide(probs, torch.tensor([0, 0, 2]), tau=0.5, alpha=1.0, beta=1.0)
    assert d.confused.tolist() == [True, False, False]
    assert d.reference[0].item() == 1                     # runner-up excluding the desired class
    assert d.omega.tolist() == pytest.approx([1 + (1 - 0.1 / 0.5), 1.0, 1.0])


def test_deterministic_reference_excludes_desired_even_if_argmax():
    probs = probs_of([[0.45, 0.35, 0.2]])
    assert core.deterministic_reference(probs, torch.tensor([0])).item() == 1


def test_stochastic_reference_seeded_and_distributed():
    probs = probs_of([[0.1, 0.6, 0.3]] * 4000)
    desired = torch.zeros(4000, dtype=torch.long)
    a = core.stochastic_reference(probs, desired, torch.Generator().manual_seed(7))
    b = core.stochastic_reference(probs, desired, torch.Generator().manual_seed(7))
    c = core.stochastic_reference(probs, desired, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a == 0).sum() == 0                            # never the desired class
    frac = (a == 1).float().mean().item()                 # 0.6 / 0.9
    assert abs(frac - 2 / 3) < 0.03


def test_fixed_reference_keeps_tau_test():
    probs = probs_of([[0.1, 0.6, 0.3], [0.9, 0.05, 0.05]])
    d = core.decide(probs, torch.tensor([0, 0]), 0.5, 1.0, 1.0, mode="fixed", fixed_reference=2)
    assert d.confused.tolist() == [True, False] and d.reference[0].item() == 2


# ------------------------------------------------------------------ combinations
def test_combinations_hand_computed():
    d1, dn, dr, g = (torch.full((1, 1, 1, 1), v) for v in (1.0, 0.5, 0.25, 0.75))
    om, w = torch.tensor([3.0]), 2.0
    assert core.combine_gfcg(d1, dr, om).item() == pytest.approx(1 + 2 * 0.75)
    base = core.cfg(d1, dn, w)
    assert base.item() == pytest.approx(1 + 1 * 0.5)
    assert core.combine_additive(base, d1, dr, om).item() == pytest.approx(1.5 + 2 * 0.75)
    atg = core.cfg(d1, g, w)
    assert atg.item() == pytest.approx(1 + 1 * 0.25)
    assert core.swap_scale(w, om).item() == pytest.approx(4.0)
    assert core.cfg(d1, dr, core.swap_scale(w, om)).item() == pytest.approx(1 + 3 * 0.75)


# ------------------------------------------------------------------ schedule
EULER_32 = torch.linspace(80, 0.002, 32).tolist() + [0.0]


def test_step_index_heun_corrector_belongs_to_next_step():
    s = [80.0, 20.0, 5.0, 1.0, 0.0]
    assert [step_index(s, v) for v in (80.0, 20.0, 5.0, 1.0)] == [0, 1, 2, 3]
    assert step_index(s, 10.0) == 1 and step_index(s, 40.0) == 0


def test_classifier_steps_window_and_period():
    assert classifier_steps(10, 0.0, 1.0, 1) == list(range(10))
    assert classifier_steps(10, 0.2, 0.6, 2) == [2, 4]
    assert classifier_steps(10, 0.0, 0.35, 3) == [0, 3]


def _sigma_trace(sigmas, sampler):
    """The sigmas at which a sampler evaluates the model (Euler: each step's start; Heun: start and
    corrector at sigma_{i+1} unless it is 0)."""
    out = []
    for i in range(len(sigmas) - 1):
        out.append(sigmas[i])
        if sampler == "heun" and sigmas[i + 1] > 0:
            out.append(sigmas[i + 1])
    return out


@pytest.mark.parametrize("period,start,end", [(1, 0.0, 1.0), (3, 0.1, 0.7), (2, 0.5, 1.0)])
def test_euler_and_heun_decide_at_same_steps(period, start, end):
    decided = {}
    for sampler in ("euler", "heun"):
        sch = GFCGSchedule(start, end, period)
        sch.begin(EULER_32)
        steps = []
        for s in _sigma_trace(EULER_32, sampler):
            i = sch.step_of(s)
            if sch.must_classify(i):
                sch.record(i, core.Decision.neutral(1))
                steps.append(i)
        decided[sampler] = steps
    assert decided["euler"] == decided["heun"] == classifier_steps(32, start, end, period)


def test_decisions_reused_between_and_none_outside_window():
    sch = GFCGSchedule(0.25, 0.75, 2)
    sch.begin(torch.linspace(10, 0, 9))                   # 8 steps: window = steps 2..5, classify 2, 4
    d2, d4 = core.Decision.neutral(1), core.Decision.neutral(1)
    sch.record(2, d2)
    sch.record(4, d4)
    assert sch.current(1) is None and sch.current(2) is d2 and sch.current(3) is d2
    assert sch.current(5) is d4 and sch.current(6) is None


# ------------------------------------------------------------------ config errors name the input
@pytest.mark.parametrize("kwargs,name", [
    (dict(tau=1.5), "tau"), (dict(tau=-0.1), "tau"), (dict(alpha=-1), "alpha"), (dict(period=0), "period"),
    (dict(window_start=0.6, window_end=0.4), "window_start"), (dict(beta=0), "beta"),
    (dict(reference_mode="fixed"), "fixed_reference"), (dict(reference_mode="fixed", fixed_reference=3), "fixed_reference"),
])
def test_config_errors_name_the_input(kwargs, name):
    with pytest.raises(GFCGInputError, match=name):
        GFCGConfig(desired_class=3, **kwargs)


# ------------------------------------------------------------------ engine with plain callables
class Toy:
    """D(x; sigma, c) = x * 0 + c / 10 per row; classifier logits: fixed rows; counts calls."""

    def __init__(self, logits):
        self.logits = logits
        self.calls = []

    def evaluate(self, x, branches):
        self.calls.append([(b.cond, None if b.rows is None else b.rows.tolist()) for b in branches])
        outs = []
        for br in branches:
            n = x.shape[0] if br.rows is None else br.rows.numel()
            if br.cond == "positive":
                v = torch.full((n,), 1.0)
            elif br.cond == "negative":
                v = torch.full((n,), 0.5)
            else:
                v = br.classes.float() / 10
            outs.append(v.view(-1, 1, 1, 1).expand(n, *x.shape[1:]).clone())
        return outs

    def classify(self, x0):
        return self.logits[: x0.shape[0]]


def run_engine(combine, mode, tau, logits, scale=3.0, classify_input="current", x=None):
    cfg = GFCGConfig(desired_class=0, tau=tau, alpha=2.0, beta=1.0, classify_input=classify_input)
    eng = GFCGEngine(cfg, combine=combine, mode=mode, scale=scale)
    eng.begin([10.0, 5.0, 0.0], seed=0)
    toy, guide = Toy(logits), Toy(logits)
    x = torch.zeros(logits.shape[0], 1, 2, 2) if x is None else x
    res = eng.denoise(x, 10.0, lambda b: toy.evaluate(x, b), toy.classify,
                      (lambda b: [o * 0 + 0.75 if br.cond == "positive" else o for o, br in zip(guide.evaluate(x, b), b)])
                      if combine == "atg" else None)
    return res, toy, guide, eng


LOGITS = torch.log(probs_of([[0.1, 0.7, 0.2], [0.9, 0.05, 0.05], [0.2, 0.1, 0.7]]))


def test_engine_tau_zero_is_plain_conditional():
    res, toy, _, _ = run_engine("none", "additive", 0.0, LOGITS)
    assert torch.equal(res.denoised, torch.ones(3, 1, 2, 2))
    assert toy.calls == [[("positive", None)]]             # no reference branch at all


def test_engine_alone_reference_rows_only_for_confused():
    res, toy, _, eng = run_engine("none", "additive", 0.5, LOGITS)
    # classify-current: D1 first, then the reference on rows 0 (ref 1) and 2 (ref 2)
    assert toy.calls == [[("positive", None)], [("reference", [0, 2])]]
    om0, om2 = 1 + 2 * (1 - 0.1 / 0.5), 1 + 2 * (1 - 0.2 / 0.5)
    got = res.denoised[:, 0, 0, 0]
    assert got[0].item() == pytest.approx(1 + (om0 - 1) * (1 - 0.1))
    assert got[1].item() == 1.0
    assert got[2].item() == pytest.approx(1 + (om2 - 1) * (1 - 0.2))
    assert eng.trace[0].reference == [1, -1, 2]


def test_engine_cfg_additive_and_swap():
    res, toy, _, _ = run_engine("cfg", "additive", 0.5, LOGITS, scale=3.0)
    assert toy.calls[0] == [("positive", None), ("negative", None)]
    om0 = 1 + 2 * (1 - 0.1 / 0.5)
    assert res.denoised[0, 0, 0, 0].item() == pytest.approx(1 + 2 * 0.5 + (om0 - 1) * 0.9)
    assert res.denoised[1, 0, 0, 0].item() == pytest.approx(1 + 2 * 0.5)
    res, toy, _, _ = run_engine("cfg", "swap", 0.5, LOGITS, scale=3.0)
    assert res.denoised[0, 0, 0, 0].item() == pytest.approx(1 + (3.0 + om0 - 1 - 1) * 0.9)
    assert res.denoised[1, 0, 0, 0].item() == pytest.approx(1 + 2 * 0.5)


def test_engine_cfg_swap_evaluates_no_more_rows_than_cfg():
    """Swap on a classifier step: D1 first; after the decision, the negative of the confident row
    and the references of the two confused rows in one forward: 2B rows, as CFG."""
    res, toy, _, _ = run_engine("cfg", "swap", 0.5, LOGITS, scale=3.0)
    assert toy.calls == [[("positive", None)], [("negative", [1]), ("reference", [0, 2])]]
    assert sum(len(r) if r is not None else 3 for call in toy.calls for _, r in call) == 2 * 3
    # every row confused: no negative at all
    all_conf = torch.log(probs_of([[0.1, 0.7, 0.2]] * 3))
    res2, toy2, _, _ = run_engine("cfg", "swap", 0.5, all_conf, scale=3.0)
    assert toy2.calls == [[("positive", None)], [("reference", [0, 1, 2])]]
    om = 1 + 2 * (1 - 0.1 / 0.5)
    assert torch.allclose(res2.denoised[:, 0, 0, 0], torch.full((3,), 0.1 + (3.0 + om - 1) * 0.9))


def test_engine_atg_swap_uses_guide_with_reference_no_extra_main_branch():
    res, toy, guide, _ = run_engine("atg", "swap", 0.5, LOGITS, scale=2.0)
    assert toy.calls == [[("positive", None)]]             # main model: D1 only
    assert guide.calls == [[("positive", [1]), ("reference", [0, 2])]]   # one guide forward
    om0 = 1 + 2 * (1 - 0.1 / 0.5)
    assert res.denoised[0, 0, 0, 0].item() == pytest.approx(1 + (2.0 + om0 - 1 - 1) * (1 - 0.1))
    assert res.denoised[1, 0, 0, 0].item() == pytest.approx(1 + 1.0 * 0.25)


def test_engine_previous_mode_one_forward_per_evaluation():
    cfg = GFCGConfig(desired_class=0, tau=0.5, alpha=2.0, beta=1.0, classify_input="previous")
    eng = GFCGEngine(cfg, combine="cfg", mode="additive", scale=3.0)
    sig = [10.0, 5.0, 2.0, 0.0]
    eng.begin(sig, seed=0)
    toy = Toy(LOGITS)
    x = torch.zeros(3, 1, 2, 2)
    for s in sig[:-1]:
        eng.denoise(x, s, lambda b: toy.evaluate(x, b), toy.classify)
    # first evaluation has no previous estimate -> classify current (2 calls); then one call each
    assert [len(c) for c in toy.calls] == [2, 1, 3, 3]
    assert toy.calls[2] == [("positive", None), ("negative", None), ("reference", [0, 2])]


def test_engine_stochastic_same_seed_same_draws():
    logits = torch.log(probs_of([[0.05, 0.3, 0.3, 0.35]] * 16))
    refs = []
    for seed in (5, 5, 6):
        cfg = GFCGConfig(desired_class=0, tau=0.5, reference_mode="stochastic")
        eng = GFCGEngine(cfg)
        eng.begin([10.0, 5.0, 0.0], seed=seed)
        toy = Toy(logits)
        x = torch.zeros(16, 1, 1, 1)
        eng.denoise(x, 10.0, lambda b: toy.evaluate(x, b), toy.classify)
        refs.append(eng.trace[0].reference)
    assert refs[0] == refs[1] and refs[0] != refs[2]


def test_engine_swap_takes_the_negative_where_no_decision_is_in_force():
    """Swap mode: the negative waits only for a decision made at this evaluation. With tau = 0 (and
    outside the window) no decision comes, so every row is confident and CFG applies: D = D_neg + w (D1 - D_neg)."""
    res, toy, _, _ = run_engine("cfg", "swap", 0.0, LOGITS, scale=3.0)
    assert toy.calls == [[("positive", None), ("negative", None)]]
    assert torch.allclose(res.denoised, torch.full((3, 1, 2, 2), 0.5 + 3.0 * 0.5))


def test_engine_cfg_at_one_is_gfcg_alone_and_cfg_fn_shapes_only_cfg():
    """w = 1 with the negative skipped (ComfyUI's cfg1 optimisation) is GFCG alone, in both modes;
    a cfg_fn (ComfyUI's CFG function with its hooks) computes the CFG part, never autoguidance's."""
    alone, _, _, _ = run_engine("none", "additive", 0.5, LOGITS)
    for mode in ("additive", "swap"):
        res, toy, _, _ = run_engine("cfg", mode, 0.5, LOGITS, scale=1.0)
        assert torch.equal(res.denoised, alone.denoised), mode
        assert all(c != "negative" for call in toy.calls for c, _ in call)
    seen = []

    def cfg_fn(d1, d_neg, w):
        seen.append((None if d_neg is None else float(d_neg.flatten()[0]), w if not torch.is_tensor(w) else "rows"))
        return d1 * 0 + 7.0

    cfg = GFCGConfig(desired_class=0, tau=0.0, alpha=2.0, beta=1.0)
    for combine, want in (("cfg", 7.0), ("atg", None)):
        eng = GFCGEngine(cfg, combine=combine, mode="additive", scale=3.0)
        eng.begin([10.0, 5.0, 0.0], seed=0)
        toy = Toy(LOGITS)
        x = torch.zeros(3, 1, 2, 2)
        res = eng.denoise(x, 10.0, lambda b: toy.evaluate(x, b), toy.classify,
                          (lambda b: [o * 0 + 0.75 for o in toy.evaluate(x, b)]) if combine == "atg" else None,
                          cfg_fn=cfg_fn)
        if want is not None:
            assert torch.equal(res.denoised, torch.full_like(x, want)) and seen == [(0.5, 3.0)]
        else:
            assert torch.allclose(res.denoised, torch.full_like(x, 0.75 + 3.0 * 0.25)) and len(seen) == 1


def test_swap_rules():
    """The four swap-mode scales for w = 2 at omega = 1 (the threshold) and omega = 5."""
    om = torch.tensor([1.0, 5.0])
    assert core.swap_scale(2.0, om, "sum").tolist() == [2.0, 6.0]
    assert core.swap_scale(2.0, om, "max").tolist() == [2.0, 5.0]
    assert core.swap_scale(2.0, om, "omega").tolist() == [1.0, 5.0]
    assert core.swap_scale(2.0, om, "base").tolist() == [2.0, 2.0]
    with pytest.raises(GFCGInputError, match="swap_rule"):
        GFCGConfig(desired_class=0, swap_rule="double")


def test_settled_samples_are_not_classified_again():
    """settle_after = 2: a row confident on two consecutive classifier steps leaves the classifier's
    batch (and the decode) for the rest of the run, and keeps omega = 1; a confused row stays in
    play; the trace keeps the settled row's last p_des."""
    seen = []
    row_probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.95, 0.05]])   # row 1 stays confused

    def classify(x0):
        ids = x0[:, 0, 0, 0].long().tolist()      # each row's x carries its row index
        seen.append(ids)
        return torch.log(row_probs[ids])

    cfg = GFCGConfig(desired_class=0, tau=0.5, alpha=2.0, settle_after=2)
    eng = GFCGEngine(cfg)
    sigmas = [10.0, 8.0, 6.0, 4.0, 2.0, 0.0]
    eng.begin(sigmas)
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2).clone()
    main = lambda branches: [x if b.rows is None else x[b.rows] for b in branches]   # noqa: E731  D1 = x
    for s in sigmas[:-1]:
        res = eng.denoise(x, s, main, classify)
    assert seen == [[0, 1, 2], [0, 1, 2], [1], [1], [1]]
    last = eng.trace[-1]
    assert last.omega[0] == 1.0 and last.omega[2] == 1.0 and last.omega[1] > 1.0
    assert last.p_des[0] == pytest.approx(0.9) and last.reference == [-1, 1, -1]
    assert res.denoised.shape == x.shape


def test_settling_is_off_by_default_and_checked():
    assert GFCGConfig(desired_class=0).settle_after == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(GFCGInputError, match="settle_after"):
            GFCGConfig(desired_class=0, settle_after=bad)
