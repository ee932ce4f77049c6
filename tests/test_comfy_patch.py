"""GFCG as a MODEL patch for KSampler / KSamplerAdvanced: the same result as the GUIDER path."""
import pytest
import torch

from conftest import node, sample

pytestmark = pytest.mark.comfy

SETTINGS = dict(desired_class="3", tau=0.9, alpha=3.0, beta=1.0, window_start=0.0, window_end=1.0, period=1,
                reference="deterministic")


def _ksampler(model, pos, neg, cfg, seed=5, steps=6, sampler="euler", advanced=False):
    import nodes

    latent = {"samples": torch.zeros(2, 3, 16, 16)}
    with torch.inference_mode():
        if advanced:
            out = nodes.KSamplerAdvanced().sample(model, "enable", seed, steps, cfg, sampler, "karras", pos, neg, latent,
                                                  0, 10000, "disable")
        else:
            out = nodes.common_ksampler(model, seed, steps, cfg, sampler, "karras", pos, neg, latent)
    return out[0]["samples"]


def _guider(env, m, pos, neg, cfg, mode):
    g = node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], **SETTINGS)
    if cfg == 1.0:
        return g
    return node(env, "GFCGCombiner", gfcg=g, combine_with="cfg", mode=mode, scale=cfg, negative=neg)


@pytest.mark.parametrize("cfg,mode,sampler,advanced", [(1.0, "additive", "euler", False),
                                                       (3.0, "additive", "euler", False),
                                                       (3.0, "swap", "heun", False),
                                                       (2.5, "additive", "dpmpp_2m", True)])
def test_model_patch_equals_guider(env, cfg, mode, sampler, advanced):
    cm = env["cm"]
    m, net = cm.tiny_model()
    pos, neg = cm.label_cond(3), cm.label_cond(None)
    patched = node(env, "GFCGModelPatch", model=m, classifier=env["clf"], mode=mode, **SETTINGS)
    net.calls.clear()
    got = _ksampler(patched, pos, neg, cfg, sampler=sampler, advanced=advanced)
    patched_calls = list(net.calls)
    net.calls.clear()
    ref = sample(_guider(env, m, pos, neg, cfg, mode), seed=5, sampler=sampler)
    assert torch.equal(got, ref)
    assert patched_calls == net.calls                     # the same forwards, batch by batch
    # the plain KSampler on the unpatched model: different samples, and fewer forwards (the patch
    # evaluates the reference branch for confused samples inside the sampler's step)
    net.calls.clear()
    plain = _ksampler(m, pos, neg, cfg, sampler=sampler, advanced=advanced)
    assert not torch.equal(got, plain)
    assert len(patched_calls) > len(net.calls)


def test_model_patch_leaves_the_input_model_alone_and_records_a_trace(env):
    import comfy.patcher_extension

    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos, neg = cm.label_cond(3), cm.label_cond(None)
    patched = node(env, "GFCGModelPatch", model=m, classifier=env["clf"], **SETTINGS)
    key = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    assert not m.get_all_wrappers(key) and len(patched.get_all_wrappers(key)) == 1
    twice = node(env, "GFCGModelPatch", model=patched, classifier=env["clf"], **SETTINGS)
    assert len(twice.get_all_wrappers(key)) == 1          # a second patch replaces the first
    _ksampler(patched, pos, neg, 1.0, steps=4)
    wrapper = patched.get_all_wrappers(key)[0]
    assert len(wrapper.last_guider.engine.trace) == 4     # one decision per step
    img = env["reg"]["GFCGTracePlot"].execute(samples={}, model=patched, width=640, height=400).result[0]
    assert img.shape == (1, 400, 640, 3) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    with pytest.raises(ValueError, match="no GFCG Model Patch"):
        env["reg"]["GFCGTracePlot"].execute(samples={}, model=m)
