"""Issue 25 (review3): the Model Patch with per-image inpainting masks (r5), a CLIP connected on a
class-label model (r9), chained Combiners (r7)."""
import logging
import sys

import pytest
import torch

from conftest import node

pytestmark = pytest.mark.comfy

SETTINGS = dict(desired_class="3", alpha=4.0, beta=1.0, window_start=0.0, window_end=1.0, period=1,
                reference="deterministic")


# --- r5: GFCG Model Patch with per-image masks ---------------------------------------------------------

def _masked_latent(batch=2, size=16):
    """A random latent and one mask per image (image i keeps a different band: left half, right half, ...)."""
    latent = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(batch, size, size)
    band = size // batch
    for i in range(batch):
        mask[i, :, i * band:(i + 1) * band] = 1.0
    return {"samples": latent, "noise_mask": mask}


def _ksampler(model, pos, neg, cfg, lat, seed=1, steps=6):
    import nodes

    with torch.inference_mode():
        out = nodes.KSampler().sample(model, seed, steps, cfg, "euler", "karras", pos, neg, lat, denoise=1.0)
    return out[0]["samples"]


@pytest.mark.parametrize("cfg,batch", [(2.0, 2), (1.0, 3)])
def test_patch_at_tau_0_equals_plain_ksampler_with_per_image_masks(env, cfg, batch):
    """tau = 0 (GFCG off) on KSampler equals the plain KSampler bit for bit, per-image masks included, and
    every image keeps its own unmasked pixels. Before: the prepared mask was prepared a second time and
    image 1 got image 0's mask."""
    import comfy.patcher_extension

    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos, neg = cm.label_cond(3), cm.label_cond(None)
    lat = _masked_latent(batch)
    patched = node(env, "GFCGModelPatch", model=m, classifier=env["clf"], tau=0.0, **SETTINGS)
    plain = _ksampler(m, pos, neg, cfg, lat)
    got = _ksampler(patched, pos, neg, cfg, lat)
    for i in range(batch):
        keep = lat["noise_mask"][i] == 0
        # (the plain KSampler itself moves a kept pixel by float rounding, ~1e-10)
        torch.testing.assert_close(got[i][:, keep], lat["samples"][i][:, keep], rtol=0, atol=1e-6,
                                   msg=lambda d: f"image {i}: unmasked pixels changed: {d}")
    assert torch.equal(got, plain), float((got - plain).abs().max())
    # the one-run mask hand-over stays on the GFCG guider's own clone, not on the patched model
    key = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    assert len(patched.get_all_wrappers(key)) == 1


def test_patch_with_per_image_masks_equals_the_guider_path(env):
    """With GFCG on (tau 0.9), the patched KSampler and GFCG Guider + Combiner(cfg) on
    SamplerCustomAdvanced give the same samples for the same masked latent (one mask preparation each)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos, neg = cm.label_cond(3), cm.label_cond(None)
    lat = _masked_latent(2)
    patched = node(env, "GFCGModelPatch", model=m, classifier=env["clf"], tau=0.9, **SETTINGS)
    got = _ksampler(patched, pos, neg, 2.0, lat)
    g = node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], tau=0.9, **SETTINGS)
    g = node(env, "GFCGCombiner", gfcg=g, combine_with="cfg", mode="additive", scale=2.0, negative=neg)
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "karras", 6)
    with torch.inference_mode():
        ref, _ = SamplerCustomAdvanced().sample(Noise_RandomNoise(1), g, comfy.samplers.sampler_object("euler"),
                                                sigmas, lat)
    assert torch.equal(got, ref["samples"])
    confused = [r for t in g.engine.trace for r in t.reference if r >= 0]
    assert confused, "GFCG never acted: the comparison would not cover the reference branch"


# --- r9: a CLIP connected on a class-label model ------------------------------------------------------

def _pack_module(env, name):
    """The pack's module ``name`` (e.g. ``guiders.checks``) as ComfyUI loaded it (under the pack's path,
    not as ``comfyui_gfcg``)."""
    return sys.modules[env["reg"]["GFCGGuider"].__module__.rsplit(".nodes.", 1)[0] + "." + name]


def _tiny_sd_clip():
    """A real ComfyUI CLIP (SD1 tokenizer and text model) with tiny random weights."""
    import comfy.sd1_clip

    from test_comfy_reference_conds import SMALL_CLIP, _tiny_clip

    return _tiny_clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, {"clip_l_model_config": SMALL_CLIP})


def _labelled_run(env, net, g):
    """Sample ``g`` and return (samples, the class label of every row the network saw)."""
    from conftest import sample

    seen = []

    def spy(module, args, kwargs):
        y = kwargs.get("y")
        if y is not None:
            seen.extend(y.argmax(-1).tolist())

    h = net.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        out = sample(g, batch=2, steps=6)
    finally:
        h.remove()
    return out, seen


def test_clip_on_a_class_label_model_uses_the_label_reference(env, caplog, monkeypatch):
    """A CLIP connected on a class-label model is ignored (said once in the log): the reference branch
    carries the reference class label, and the samples equal those of the same guider without the CLIP.
    Before: the text reference won, the label stayed the desired class and GFCG did nothing."""
    monkeypatch.setattr(_pack_module(env, "guiders.checks"), "_clip_ignored_said", False, raising=False)
    LabelReference = _pack_module(env, "guiders.references").LabelReference
    cm = env["cm"]
    m, net = cm.tiny_model()
    clip = _tiny_sd_clip()
    kw = dict(model=m, positive=cm.label_cond(3), classifier=env["clf"], tau=1.0, **SETTINGS)
    with caplog.at_level(logging.WARNING, logger="comfyui_gfcg"):
        with_clip = node(env, "GFCGGuider", clip=clip, **kw)
        node(env, "GFCGGuider", clip=clip, **kw)          # a second guider: no second log line
    # the reference for class 5 asks the network for class 5 (before: the desired class 3, text swapped)
    assert with_clip.reference(5)[0][1]["class_labels"].argmax(-1).tolist() == [5]
    assert isinstance(with_clip.reference, LabelReference)
    said = [r.getMessage() for r in caplog.records if "CLIP" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("clip: ") and "ignored" in said[0], said

    got, seen = _labelled_run(env, net, with_clip)
    refs = {r for t in with_clip.engine.trace for r in t.reference if r >= 0}
    assert refs and 3 not in refs                         # tau 1: every sample confused, pushed from others
    assert refs <= set(seen), (refs, sorted(set(seen)))   # the reference rows carried those labels
    without, seen_without = _labelled_run(env, net, node(env, "GFCGGuider", **kw))
    assert torch.equal(got, without) and seen == seen_without
    off, _ = _labelled_run(env, net, node(env, "GFCGGuider", clip=clip, **{**kw, "tau": 0.0}))
    assert not torch.equal(got, off)                      # GFCG acts


# --- r7: chained Combiners -----------------------------------------------------------------------------

@pytest.mark.parametrize("first,second,named", [("cfg", "autoguidance", "cfg"), ("autoguidance", "cfg", "autoguidance"),
                                                ("cfg", "cfg", "cfg")])
def test_combiner_refuses_a_combiner_output(env, first, second, named):
    """A Combiner fed another Combiner's output refuses, naming gfcg (the engine stacks GFCG on one of
    CFG or autoguidance). Before: it rebuilt from the GFCG Guider's settings and the first stacking
    (e.g. the CFG scale and negative) vanished without a message."""
    cm = env["cm"]
    m, _ = cm.tiny_model()
    guide, _ = cm.tiny_model(seed=1, width=8)
    g = node(env, "GFCGGuider", model=m, positive=cm.label_cond(3), classifier=env["clf"], tau=0.5, **SETTINGS)
    extra = {"cfg": dict(negative=cm.label_cond(None)), "autoguidance": dict(guide_model=guide)}
    c1 = node(env, "GFCGCombiner", gfcg=g, combine_with=first, mode="auto", scale=5.0, **extra[first])
    assert c1.engine.combine == ("cfg" if first == "cfg" else "atg")
    with pytest.raises(ValueError, match=rf"^gfcg: this guider already comes from a GFCG Combiner \({named}\); "
                                         "connect the GFCG Guider itself"):
        node(env, "GFCGCombiner", gfcg=c1, combine_with=second, mode="auto", scale=2.0, **extra[second])
    # the GFCG Guider itself still stacks, and the first Combiner's guider is left as it was
    c2 = node(env, "GFCGCombiner", gfcg=g, combine_with=second, mode="auto", scale=2.0, **extra[second])
    assert c2.engine.combine == ("cfg" if second == "cfg" else "atg") and c1.engine.scale == 5.0
