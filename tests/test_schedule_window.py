"""The guidance window keyed to the model's sigma range (split runs guide what one run guides), the
sigma -> step rule under other samplers (ties at sigma_{i+1}, churn), the gradient guider's step
size, and reversed schedules refused. Framework-free: no ComfyUI (the ComfyUI side is
tests/test_comfy_schedule.py)."""
import functools
import math

import pytest
import torch

from comfyui_gfcg.guiders.config import GFCGConfig, GFCGInputError
from comfyui_gfcg.guiders.schedule import GFCGSchedule, step_index


def karras(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """k-diffusion's get_sigmas_karras (float32, then 0), written out."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)]).tolist()


def _p2s():
    from comfyui_gfcg.guiders.schedule import edm_percent_to_sigma

    return functools.partial(edm_percent_to_sigma, sigma_min=0.002, sigma_max=80.0)


def _guided(sch, sigmas):
    return [sigmas[i] for i in range(len(sigmas) - 1) if sch.in_window(i)]


def _classified(sch, sigmas):
    out = []
    for i in range(len(sigmas) - 1):
        if sch.must_classify(i):
            sch.record(i, None)
            out.append(sigmas[i])
    return out


# ------------------------------------------------------------------ (4) the window
def test_edm_percent_to_sigma_is_comfyuis_log_linear_map():
    p2s = _p2s()
    assert p2s(0.5) == pytest.approx(math.sqrt(0.002 * 80.0), rel=1e-12)
    assert p2s(0.25) == pytest.approx(80.0 ** 0.75 * 0.002 ** 0.25, rel=1e-12)
    assert p2s(0.0) == math.inf and p2s(-1.0) == math.inf
    assert p2s(1.0) == 0.0 and p2s(2.0) == 0.0
    grid = [p2s(k / 20) for k in range(21)]
    assert all(a > b for a, b in zip(grid, grid[1:]))


@pytest.mark.parametrize("start,end,period", [(0.5, 1.0, 1), (0.0, 0.5, 1), (0.2, 0.9, 1), (0.3, 0.6, 1)])
def test_split_passes_guide_the_steps_one_pass_guides(start, end, period):
    """KSamplerAdvanced 0-4 then 4-8 hands the guider two slices of one schedule: a window keyed to
    the model's sigma range guides the same steps (review: ksadv.py)."""
    full = karras(8)
    p2s = _p2s()
    one = GFCGSchedule(start, end, period)
    one.begin(full, percent_to_sigma=p2s)
    parts = []
    for lo, hi in ((0, 4), (4, 8)):
        sch = GFCGSchedule(start, end, period)
        sch.begin(full[lo:hi + 1], percent_to_sigma=p2s)
        parts.append(sch)
    assert _guided(parts[0], full[:5]) + _guided(parts[1], full[4:]) == _guided(one, full)
    assert _classified(parts[0], full[:5]) + _classified(parts[1], full[4:]) == _classified(one, full)
    hi_s = math.inf if start <= 0 else p2s(start)
    lo_s = -math.inf if end >= 1 else p2s(end)
    assert _guided(one, full) == [s for s in full[:-1] if lo_s < s <= hi_s]


def test_window_edges_follow_the_sigma_direction():
    """Step i is inside iff percent_to_sigma(end) < sigma_i <= percent_to_sigma(start): the start
    edge (high noise) is included, the end edge is not, so (0, a) and (a, 1) split the steps."""
    full = [80.0, 10.0, 0.4, 0.1, 0.0]                        # 0.4 = percent_to_sigma(0.5) up to round-off
    p2s = lambda p: {0.5: 0.4}.get(p, math.inf if p <= 0 else 0.0)   # noqa: E731
    first, second = GFCGSchedule(0.0, 0.5, 1), GFCGSchedule(0.5, 1.0, 1)
    first.begin(full, percent_to_sigma=p2s)
    second.begin(full, percent_to_sigma=p2s)
    assert _guided(first, full) == [80.0, 10.0] and _guided(second, full) == [0.4, 0.1]


@pytest.mark.parametrize("sigmas", [karras(8), karras(1), [1.0, 0.5, 0.0], [14.6, 0.03], [3.0, 2.0, 2.0, 1.0, 0.0],
                                    [1e9, 1.0, 0.0], [1.0, 1e-6]])
def test_the_full_window_keeps_every_step(sigmas):
    """The default window (0, 1) keeps every step whatever the model's range, so decisions at the
    default settings do not change."""
    for p2s in (None, _p2s(), lambda p: 1.0 if p <= 0 else (0.0 if p >= 1 else 1 - p)):
        sch = GFCGSchedule(0.0, 1.0, 1)
        sch.begin(sigmas, percent_to_sigma=p2s)
        assert [i for i in range(len(sigmas) - 1) if sch.in_window(i)] == list(range(len(sigmas) - 1))


def test_period_counts_from_the_first_window_step_of_each_pass():
    """The period cannot see the steps before a slice: each pass counts from its first window step
    (documented). One pass of 8: 0, 2, 4, 6; passes 0-3 and 3-8: 0, 2 and 3, 5, 7."""
    full = karras(8)
    one = GFCGSchedule(0.0, 1.0, 2)
    one.begin(full, percent_to_sigma=_p2s())
    assert _classified(one, full) == [full[i] for i in (0, 2, 4, 6)]
    a, b = GFCGSchedule(0.0, 1.0, 2), GFCGSchedule(0.0, 1.0, 2)
    a.begin(full[:4], percent_to_sigma=_p2s())
    b.begin(full[3:], percent_to_sigma=_p2s())
    assert _classified(a, full[:4]) + _classified(b, full[3:]) == [full[i] for i in (0, 2, 3, 5, 7)]


def test_without_a_model_schedule_the_window_is_a_fraction_of_the_steps_given():
    sch = GFCGSchedule(0.25, 0.75, 1)
    sch.begin(torch.linspace(10, 0, 9))
    assert [i for i in range(8) if sch.in_window(i)] == [2, 3, 4, 5]


def test_headless_sampler_keys_the_window_to_the_testbed_models_range():
    """The headless sampler passes the testbed models' percent -> sigma (EDM, 0.002 .. 80), as
    ComfyUI does for the same models: window (0.5, 1) guides the steps with sigma <= 0.4."""
    from comfyui_gfcg.testbed import sampler as tb
    from comfyui_gfcg.testbed.toy import edm_sigmas

    def main(x, sigma, labels):
        return torch.zeros_like(x)

    def clf(images):
        return torch.zeros(images.shape[0], 10)               # p_des = 0.1: confused at tau 0.5

    cfg = GFCGConfig(desired_class=3, tau=0.5, window_start=0.5, window_end=1.0)
    r = tb.sample(main, clf, "gfcg", 3, 1, steps=18, gfcg=cfg, shape=(3, 4, 4))
    s = edm_sigmas(18).tolist()
    bound = math.sqrt(0.002 * 80.0)
    assert [t.step for t in r.trace] == [i for i in range(18) if s[i] <= bound] == list(range(12, 18))
    assert tb.SIGMA_MIN == pytest.approx(s[-2], rel=1e-6) and tb.SIGMA_MAX == s[0]


# ------------------------------------------------------------------ (7) the step of an evaluation
def _ancestral_midpoint(s, s_next):
    """DPM++ 2S ancestral's midpoint (eta 1) as k-diffusion computes it, in float32: exactly
    sigma_{i+1} in exact arithmetic, off by round-off (up to 1e-3 relative at large step ratios)."""
    s, s_next = torch.tensor(s), torch.tensor(s_next)
    up = torch.minimum(s_next, (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
    down = (s_next ** 2 - up ** 2) ** 0.5
    t, t_next = -s.log(), -down.log()
    return float((t + (t_next - t) * 0.5).neg().exp())


@pytest.mark.parametrize("n", [3, 4, 7, 10, 18, 40])
def test_an_evaluation_at_the_next_sigma_belongs_to_the_next_step_whatever_the_rounding(n):
    sig = karras(n)
    for i in range(n - 1):
        nxt = sig[i + 1]
        for v in (nxt, nxt * (1 + 1e-5), nxt * (1 - 1e-5), nxt * (1 + 1e-3), _ancestral_midpoint(sig[i], nxt)):
            assert step_index(sig, v) == i + 1, (i, v / nxt - 1)
        # an intermediate sigma (DPM2's log-midpoint) stays in its step; just above sigma_i too
        assert step_index(sig, math.sqrt(sig[i] * nxt)) == i
        assert step_index(sig, sig[i] * (1 + 1e-6)) == i
    assert step_index(sig, sig[0] * 1.3) == 0                   # above the schedule: the first step


def test_churned_starts_belong_to_their_own_step():
    """Euler / Heun / DPM2 with s_churn evaluate step i at sigma_hat_i = sigma_i (1 + gamma_i) >
    sigma_i (Karras et al. 2022, Alg. 2): it is step i's start, not an intermediate of step i - 1
    (review: churn.py). Heun's corrector at sigma_{i+1} stays in step i + 1."""
    from comfyui_gfcg.guiders.schedule import churned_starts, step_starts

    sig = karras(6)
    opts = {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0, "eta": 1.0}
    starts = step_starts(sig, opts)
    gamma = min(10.0 / 6, 2 ** 0.5 - 1)
    assert starts == churned_starts(sig, 10.0, 0.05, 50.0)
    assert starts == [s * (1 + gamma) if 0.05 <= s <= 50.0 else s for s in sig[:-1]]
    assert starts[0] == sig[0] and starts[-1] == sig[5]         # outside [s_tmin, s_tmax]: no churn
    # float32, as the sampler computes it: sigmas[i] * (gamma + 1)
    hats = [float(torch.tensor(s) * ((gamma if 0.05 <= s <= 50.0 else 0.0) + 1)) for s in sig[:-1]]
    assert [step_index(sig, h, starts) for h in hats] == list(range(6))
    assert [step_index(sig, s, starts) for s in sig[1:-1]] == [1, 2, 3, 4, 5]
    assert step_starts(sig, None) == step_starts(sig, {"eta": 0.5}) == sig[:-1]
    sch = GFCGSchedule(0.0, 1.0, 2)
    sch.begin(sig, sampler_options=opts)
    decided = []
    for h in hats:
        i = sch.step_of(h)
        if sch.must_classify(i):
            sch.record(i, None)
            decided.append(i)
    assert decided == [0, 2, 4]


# ------------------------------------------------------------------ (7) the gradient guider's step size
def _linear_cg(steps_sigmas, options=None, scale=0.3):
    """A CG engine whose classifier has a constant gradient (so delta_i = w_i a exactly) and an
    Euler sampler (with churn from ``options``) on a model that tracks x (D = x): the sampler moves
    x by the guidance term alone. Returns (per-step displacement, delta_i)."""
    from comfyui_gfcg.guiders.gradient import CGConfig, CGEngine, guidance_weight
    from comfyui_gfcg.guiders.schedule import step_starts

    a = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)

    def logits(x0):
        return torch.stack([(x0 * a).sum((1, 2, 3)), torch.zeros(x0.shape[0])], 1)

    eng = CGEngine(CGConfig(desired_class=0, scale=scale, gamma=0.0, normalise=False))
    eng.begin(steps_sigmas, sampler_options=options)
    starts = step_starts(steps_sigmas, options)
    x = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    moves = []
    n = len(steps_sigmas) - 1
    for i in range(n):
        s_hat = float(torch.tensor(starts[i]))
        before = x.clone()
        den = eng.denoise(x, s_hat, lambda branches: [x.clone()], logits).denoised
        x = x + (x - den) / s_hat * (steps_sigmas[i + 1] - s_hat)
        moves.append((x - before).flatten())
    deltas = [guidance_weight(i, n, scale, 0.0) * a.flatten().double() for i in range(n)]
    return moves, deltas


def test_gradient_step_is_delta_per_euler_step_with_and_without_churn():
    sig = karras(6)
    for options in (None, {"s_churn": 10.0}):
        moves, deltas = _linear_cg(sig, options)
        for m, d in zip(moves, deltas):
            torch.testing.assert_close(m, d, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ (7) reversed schedules
REVERSED = [0.0001, 0.5, 3.0, 14.6]                              # FlipSigmas (inversion): increasing


def test_reversed_schedule_is_refused_by_the_gfcg_schedule():
    sch = GFCGSchedule(0.0, 1.0, 1)
    with pytest.raises(GFCGInputError, match=r"^sigmas: .*decrease.*0\.0001 -> 0\.5"):
        sch.begin(torch.tensor(REVERSED))


def test_reversed_schedule_is_refused_by_the_gradient_guider():
    from comfyui_gfcg.guiders.gradient import CGConfig, CGEngine

    with pytest.raises(GFCGInputError, match=r"^sigmas: .*decrease"):
        CGEngine(CGConfig()).begin(REVERSED)


def test_flat_steps_are_allowed_and_own_no_evaluation():
    sig = [3.0, 2.0, 2.0, 1.0, 0.0]
    sch = GFCGSchedule(0.0, 1.0, 1)
    sch.begin(sig)
    assert [sch.step_of(s) for s in (3.0, 2.0, 1.5, 1.0)] == [0, 2, 2, 3]
