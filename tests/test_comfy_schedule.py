"""ComfyUI side of the schedule: the window keyed to the model's sigma range (KSamplerAdvanced split
into passes guides what one pass guides; the headless sampler decides as ComfyUI does), the step
of an evaluation under ComfyUI's samplers (churn, ancestral midpoints at sigma_{i+1}), reversed
schedules refused by both guiders, and the gradient guider's per-sampler strength (the
per-sampler table in docs/formulas.md is this file's measurement:
``python -m pytest tests/test_comfy_schedule.py -k strength -s`` prints it)."""
import types

import pytest
import torch

from conftest import REPO, node, sample

pytestmark = pytest.mark.comfy

KW = dict(desired_class="3", tau=1.0, alpha=2.0, beta=1.0, window_start=0.0, window_end=1.0, period=1,
          reference="deterministic")
CG = dict(desired_class="3", scale=0.05, gamma=0.3, softplus_beta=5.0, tau1=1.0, tau2=0.0,
          classifier_input="denoised", cfg=1.0)


def _spy(guider):
    """Record (sigma, assigned step) of every evaluation of a GFCG guider."""
    evals = []
    orig = guider.engine.denoise

    def den(x, sigma, *a, **k):
        evals.append((float(sigma), guider.engine.schedule.step_of(float(sigma))))
        return orig(x, sigma, *a, **k)

    guider.engine.denoise = den
    return evals


def _run(guider, sigmas, sampler, seed=1, batch=1):
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    latent = {"samples": torch.zeros(batch, 3, 16, 16)}
    with torch.inference_mode():
        return SamplerCustomAdvanced().sample(Noise_RandomNoise(seed), guider, sampler, sigmas, latent)[0]["samples"]


def _karras(guider, steps):
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "karras", steps)


# ------------------------------------------------------------------ (4) the window
@pytest.mark.parametrize("start", [0.5, 0.2])
def test_ksampler_advanced_split_guides_the_steps_one_pass_guides(env, start):
    """KSamplerAdvanced 0-4 then 4-8 (the model patch): the classifier runs at the same sigmas as in
    one 0-8 pass, the steps whose sigma is at or below percent_to_sigma(start) (review: ksadv.py,
    where pass 0-4 guided its steps 2 and 3 at window_start 0.5)."""
    import comfy.patcher_extension as pe
    import nodes as comfy_nodes

    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos, neg = cm.label_cond(3), cm.label_cond(None)
    pm = node(env, "GFCGModelPatch", model=m, classifier=env["clf"], **dict(KW, window_start=start))
    wrapper = pm.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, "comfyui_gfcg.model_patch")[0]
    lat = {"samples": torch.zeros(1, 3, 16, 16)}
    ks = comfy_nodes.KSamplerAdvanced()
    with torch.inference_mode():
        ks.sample(pm, "enable", 1, 8, 1.0, "euler", "karras", pos, neg, lat, 0, 8, "disable")
        one = [t.sigma for t in wrapper.last_guider.engine.trace]
        a = ks.sample(pm, "enable", 1, 8, 1.0, "euler", "karras", pos, neg, lat, 0, 4, "enable")[0]
        first = [t.sigma for t in wrapper.last_guider.engine.trace]
        ks.sample(pm, "disable", 1, 8, 1.0, "euler", "karras", pos, neg, a, 4, 8, "disable")
        second = [t.sigma for t in wrapper.last_guider.engine.trace]
    full = _karras(wrapper.last_guider, 8).tolist()
    bound = m.get_model_object("model_sampling").percent_to_sigma(start)
    assert one == [s for s in full[:-1] if s <= bound] and len(one) == {0.5: 3, 0.2: 5}[start]
    assert first + second == one


def test_window_decisions_equal_the_headless_samplers(env):
    """The headless sampler's percent -> sigma (testbed.sampler.percent_to_sigma) against ComfyUI's
    model_sampling for the testbed models (EDM2's range): the same window steps on ComfyUI's own
    karras sigmas for every window on a 0.05 grid; and a GFCG Guider run with window (0.3, 0.8)
    classifies at the steps the headless schedule picks."""
    import comfy.model_sampling

    from comfyui_gfcg.edm2.comfy_model import SAMPLING
    from comfyui_gfcg.guiders.schedule import GFCGSchedule, window_steps
    from comfyui_gfcg.testbed import sampler as tb

    assert (tb.SIGMA_MIN, tb.SIGMA_MAX) == (SAMPLING["sigma_min"], SAMPLING["sigma_max"])
    ms = comfy.model_sampling.ModelSamplingContinuousEDM()
    ms.set_parameters(SAMPLING["sigma_min"], SAMPLING["sigma_max"], SAMPLING["sigma_data"])
    import comfy.samplers

    for steps in (6, 18, 32):
        sig = comfy.samplers.calculate_sigmas(ms, "karras", steps).float().tolist()
        for a in range(21):
            for b in range(a + 1, 21):
                s, e = a / 20, b / 20
                assert window_steps(sig, s, e, ms.percent_to_sigma) == window_steps(sig, s, e, tb.percent_to_sigma)
    for k in range(1, 20):
        assert tb.percent_to_sigma(k / 20) == pytest.approx(ms.percent_to_sigma(k / 20), rel=1e-6)

    cm = env["cm"]
    m, _ = cm.tiny_model()                                        # an EDM model on the same range
    g = node(env, "GFCGGuider", model=m, positive=cm.label_cond(3), classifier=env["clf"],
             **dict(KW, window_start=0.3, window_end=0.8, period=2))
    sample(g, sampler="heun", steps=10)
    headless = GFCGSchedule(0.3, 0.8, 2)
    headless.begin(_karras(g, 10), percent_to_sigma=tb.percent_to_sigma)
    expect = sorted(headless._classify)
    assert expect == [5, 7]                                       # sigma 1.50 .. 0.020 of 80 .. 0.002: steps 5-8
    assert [t.step for t in g.engine.trace] == expect


# ------------------------------------------------------------------ (7) the step of an evaluation
# evaluation -> step, per sampler, on 7 karras steps (to sigma = 0): the reached steps in order
PATTERNS = {
    "euler": [0, 1, 2, 3, 4, 5, 6],
    "euler_ancestral": [0, 1, 2, 3, 4, 5, 6],
    "heun": [0] + [k for k in range(1, 7) for _ in (0, 1)],                  # corrector at sigma_{i+1}: step i+1
    "dpm_2": [k for k in range(6) for _ in (0, 1)] + [6],                     # log-midpoint: its own step
    "dpm_2_ancestral": [0] + [k for k in range(1, 7) for _ in (0, 1)],       # midpoint = sigma_{i+1} (eta 1)
    "dpmpp_2s_ancestral": [0] + [k for k in range(1, 7) for _ in (0, 1)],    # midpoint = sigma_{i+1} (eta 1)
}


@pytest.mark.parametrize("sampler", sorted(PATTERNS))
def test_each_evaluation_belongs_to_the_step_the_sampler_is_in(env, sampler):
    """Midpoints of the ancestral 2nd-order samplers land on sigma_{i+1} up to float32 round-off:
    they belong to step i+1 whatever the rounding (review: sched.py, where the last one fell in
    step 5); every step's decision is made at its own sigma_i, as Euler makes it."""
    import comfy.samplers

    cm = env["cm"]
    m, _ = cm.tiny_model()
    g = node(env, "GFCGGuider", model=m, positive=cm.label_cond(3), classifier=env["clf"], **dict(KW, period=3))
    evals = _spy(g)
    sigmas = _karras(g, 7)
    _run(g, sigmas, comfy.samplers.sampler_object(sampler))
    assert [s for _, s in evals] == PATTERNS[sampler]
    assert [(t.step, round(t.sigma, 4)) for t in g.engine.trace] == [(i, round(float(sigmas[i]), 4)) for i in (0, 3, 6)]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_churned_steps_decide_at_their_own_step(env, sampler):
    """s_churn > 0 (a KSAMPLER's extra_options, as custom sampler nodes set them): step i is
    evaluated at sigma_hat_i = sigma_i (1 + gamma) > sigma_i, which belongs to step i, not i - 1
    (review: churn.py: the decisions of steps 2 and 4 were made at steps 3 and 5)."""
    import comfy.samplers
    from comfy.k_diffusion import sampling as kd

    cm = env["cm"]
    m, _ = cm.tiny_model()
    g = node(env, "GFCGGuider", model=m, positive=cm.label_cond(3), classifier=env["clf"], **dict(KW, period=2))
    evals = _spy(g)
    sigmas = _karras(g, 6)
    fn = {"euler": kd.sample_euler, "heun": kd.sample_heun}[sampler]
    _run(g, sigmas, comfy.samplers.KSAMPLER(fn, extra_options={"s_churn": 10.0}))
    hat = [float(s) * 2 ** 0.5 for s in sigmas[:-1]]               # gamma = min(10 / 6, sqrt(2) - 1)
    steps = [s for _, s in evals]
    assert steps == (list(range(6)) if sampler == "euler" else [0] + [k for k in range(1, 6) for _ in (0, 1)])
    # Euler reaches steps 2 and 4 at sigma_hat; Heun first at its corrector (sigma_i, as without churn)
    first = [(0, 1.0), (2, 1.0), (4, 1.0)] if sampler == "euler" else [(0, 1.0), (2, 0.7071), (4, 0.7071)]
    assert [(t.step, round(t.sigma / hat[t.step], 4)) for t in g.engine.trace] == first

    cg = node(env, "GFCGClassifierGuidance", model=m, positive=cm.label_cond(3), classifier=env["clf"], **CG)
    _run(cg, sigmas, comfy.samplers.KSAMPLER(fn, extra_options={"s_churn": 10.0}))
    assert [t.step for t in cg.engine.trace] == steps


# ------------------------------------------------------------------ (7) reversed schedules
def _flipped(sigmas):
    """ComfyUI's FlipSigmas: reverse, and a first sigma of 0 becomes 0.0001 (inversion)."""
    s = sigmas.flip(0).clone()
    if s[0] == 0:
        s[0] = 0.0001
    return s


def test_reversed_sigmas_are_refused_by_both_guiders(env):
    """FlipSigmas (inversion) made the gradient guider fail with 'step sigmas must decrease' in the
    middle of sampling and GFCG map its evaluations to arbitrary steps: both refuse it up front,
    naming the sigmas input (the pack's GFCGInputError, as ComfyUI's copy of the pack raises it)."""
    import comfy.samplers

    cm = env["cm"]
    m, _ = cm.tiny_model()
    guiders = [node(env, "GFCGGuider", model=m, positive=cm.label_cond(3), classifier=env["clf"], **KW),
               node(env, "GFCGClassifierGuidance", model=m, positive=cm.label_cond(3), classifier=env["clf"], **CG)]
    for g in guiders:
        with pytest.raises(Exception, match=r"^sigmas: guidance needs a schedule that decreases.*FlipSigmas") as err:
            _run(g, _flipped(_karras(g, 4)), comfy.samplers.sampler_object("euler"))
        assert type(err.value).__name__ == "GFCGInputError"


# ------------------------------------------------------------------ (7) the gradient guider's strength
STRENGTH_SAMPLERS = [("euler", {}), ("euler, s_churn 1", {"s_churn": 1.0, "s_noise": 0.0}), ("heun", {}), ("dpm_2", {}),
                     ("dpmpp_2m", {}), ("lms", {}), ("euler_ancestral", {}), ("dpm_2_ancestral", {}),
                     ("dpmpp_2s_ancestral", {})]


def cg_run(sampler: str, options: dict, sigma_data=None, steps: int = 18):
    """(final x, per-step displacements, delta_i) of one of ComfyUI's k-diffusion samplers on its
    karras schedule (the testbed workflow's: 18 steps on EDM's range 0.002 .. 80) with the gradient
    guider's term alone: the classifier's gradient is constant (delta_i = w_i a exactly, s = 1,
    gamma = 0, no normalisation), x starts at 0, ancestral and churn noise are off. The model is
    D = x (``sigma_data`` None: it follows x, the frame of ``denoised_term``'s derivation, where
    without guidance x stays put) or the exact denoiser of Gaussian data N(0, sigma_data^2),
    D = x sigma_data^2 / (sigma^2 + sigma_data^2); everything is linear, so the noise-free run is the
    mean of the noisy one: the final x is the shift of the output's mean by the guidance."""
    from comfy.k_diffusion import sampling as kd

    from comfyui_gfcg.guiders.gradient import CGConfig, CGEngine, guidance_weight

    name = sampler.split(",")[0]
    ms = types.SimpleNamespace(sigma_min=torch.tensor(0.002), sigma_max=torch.tensor(80.0))
    sigmas = kd.get_sigmas_karras(steps, 0.002, 80.0).double()
    eng = CGEngine(CGConfig(desired_class=0, scale=1.0, gamma=0.0, normalise=False))
    eng.begin(sigmas.float(), sampler_options=options)
    a = torch.ones(1, 1, 1, 1, dtype=torch.float64)

    def logits(x0):
        return torch.stack([(x0 * a).sum((1, 2, 3)), torch.zeros(x0.shape[0], dtype=x0.dtype)], 1)

    class Model:
        inner_model = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=ms))

        def __call__(self, x, s, **kw):
            sig = float(s.flatten()[0])
            c = 1.0 if sigma_data is None else sigma_data ** 2 / (sig ** 2 + sigma_data ** 2)
            return eng.denoise(x, sig, lambda branches: [x * c], logits).denoised.double()

    xs = []
    kw = dict(options)
    if "ancestral" in name:
        kw["noise_sampler"] = lambda s, t: torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    fn = getattr(kd, f"sample_{name}")
    out = fn(Model(), torch.zeros(1, 1, 1, 1, dtype=torch.float64), sigmas, callback=lambda d: xs.append(float(d["x"])),
             disable=True, **kw)
    xs.append(float(out))
    moves = [b - c for b, c in zip(xs[1:], xs[:-1])]
    return float(out), moves, [guidance_weight(i, steps, 1.0, 0.0) for i in range(steps)]


def _table():
    rows = ["| sampler | x moved per run, model follows x (× Euler) | per step, min – max | output mean shift, "
            "Gaussian data σ_data 0.5 (× Euler) |", "| --- | ---: | ---: | ---: |"]
    euler_gauss = cg_run("euler", {}, sigma_data=0.5)[0]
    for name, opts in STRENGTH_SAMPLERS:
        total, moves, deltas = cg_run(name, opts)
        ratios = [m / d for m, d in zip(moves, deltas)]
        gauss = cg_run(name, opts, sigma_data=0.5)[0] / euler_gauss
        rows.append(f"| {name} | {total / sum(deltas):.2f} | {min(ratios):.2f} – {max(ratios):.2f} | {gauss:.2f} |")
    return rows


def test_gradient_guidance_strength_per_sampler_is_the_documented_table(env):
    """The per-sampler table in docs/formulas.md (off-the-shelf classifier guidance) is this measurement
    (18 karras steps)."""
    rows = _table()
    print("\n" + "\n".join(rows))
    assert rows[2] == "| euler | 1.00 | 1.00 – 1.00 | 1.00 |"
    assert rows[3].startswith("| euler, s_churn 1 | 1.00 | 1.00 – 1.00 |")     # churned starts: delta per step
    page = (REPO / "docs" / "formulas.md").read_text()
    for r in rows:
        assert r in page, f"docs/formulas.md's per-sampler table is out of date; measured:\n" + "\n".join(rows)
