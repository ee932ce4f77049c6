"""decode = auto and decode_resolution = auto (the nodes' defaults) on real ComfyUI: TAESD where
models/vae_approx has the model's, the full VAE otherwise (said once in the log), and the latent
shrunk to what the classifier reads before it is decoded."""
import logging

import pytest
import torch

from conftest import node, sample

pytestmark = pytest.mark.comfy

G = dict(desired_class="3", tau=1.0, alpha=2.0, beta=1.0, window_start=0.0, window_end=1.0, period=1,
         reference="deterministic")


def _spy_decodes(module, attr="decode"):
    """Record the latent shapes a decoder's ``decode`` is called with."""
    seen, orig = [], getattr(module, attr)

    def spy(z, *a, **k):
        seen.append(tuple(z.shape[-2:]))
        return orig(z, *a, **k)

    setattr(module, attr, spy)
    return seen


def test_auto_decode_falls_back_to_the_vae_then_takes_taesd_and_auto_resolution_shrinks(env, tmp_path_factory, caplog,
                                                                                       monkeypatch):
    import sys

    from comfyui_gfcg.guiders.pixels import auto_latent_size
    from comfyui_gfcg.testbed.decode_bench import taesd_file

    # the pack as ComfyUI loaded it (its own module names, not comfyui_gfcg's)
    comfy_decode = sys.modules[env["reg"]["GFCGGuider"].__module__.rsplit(".nodes.", 1)[0] + ".guiders.comfy_decode"]
    cm = env["cm"]
    m, _ = cm.tiny_model(latent=True)
    pos = cm.label_cond(3)
    vae = cm.taesd_vae()
    comfy_decode._told.clear()
    # no TAESD file (other tests of the session may have registered one in models/vae_approx)
    monkeypatch.setattr(comfy_decode, "taesd_files", lambda name: [])
    with caplog.at_level(logging.INFO, logger="comfyui_gfcg"):
        g = node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], vae=vae, **G)   # node defaults
        node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], vae=vae, **G)
    told = [r.getMessage() for r in caplog.records if "decode = auto" in r.getMessage()]
    assert g.decoder.method == "vae" and len(told) == 1 and "full VAE" in told[0] and "taesd_decoder" in told[0]
    # the classifier reads 32 px (input 32, crop 1.0): a 16x16 latent (128 px) is decoded at 4x4 (32 px)
    assert g.decoder.target_size(16, 16) == auto_latent_size(16, 16, 8, env["clf"].classifier.resize_size) == (4, 4)
    seen = _spy_decodes(vae.first_stage_model)
    out = sample(g, channels=4, size=16)
    assert torch.isfinite(out).all() and seen and set(seen) == {(4, 4)}

    monkeypatch.undo()
    taesd_file(str(tmp_path_factory.mktemp("vae_approx")))          # random weights, registered in vae_approx
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="comfyui_gfcg"):
        t = node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], vae=vae, **G)
    assert t.decoder.method == "taesd"
    assert any("TAESD (taesd_decoder)" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(sample(t, channels=4, size=16)).all()
    # an explicit choice is kept as it is
    v = node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], vae=vae, decode="vae",
             decode_resolution=1.0, **G)
    assert v.decoder.method == "vae" and v.decoder.target_size(16, 16) == (16, 16)


def test_settle_after_reaches_the_engine_and_saves_classifier_rows(env):
    """The node input: settled samples are not classified again, so fewer classifier rows, and with
    tau 1 (nobody is confident) nothing settles and the result is unchanged."""
    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos = cm.label_cond(3)
    calls = []
    clf = env["clf"].classifier
    orig = clf.forward

    def counting(x):
        calls.append(x.shape[0])
        return orig(x)

    clf.forward = counting
    try:
        base = dict(G, tau=0.0001)   # every sample confident: all settle after two steps
        plain = node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], **base)
        settled = node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], settle_after=2, **base)
        assert settled.engine.config.settle_after == 2 and plain.engine.config.settle_after == 0
        calls.clear()
        a = sample(plain, steps=8)
        n_plain = sum(calls)
        calls.clear()
        b = sample(settled, steps=8)
        n_settled = sum(calls)
        assert torch.equal(a, b) and 0 < n_settled < n_plain
        unsure = dict(G, tau=1.0)
        assert torch.equal(sample(node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], **unsure)),
                           sample(node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], settle_after=2,
                                       **unsure)))
    finally:
        clf.forward = orig


def test_combiner_mode_auto_is_swap_on_autoguidance_and_additive_on_cfg(env):
    cm = env["cm"]
    m, _ = cm.tiny_model()
    guide, _ = cm.tiny_model(seed=5)
    pos, neg = cm.label_cond(3), cm.label_cond(None)
    g = node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], **G)
    atg = node(env, "GFCGCombiner", gfcg=g, combine_with="autoguidance", mode="auto", scale=2.0, guide_model=guide)
    cfg = node(env, "GFCGCombiner", gfcg=g, combine_with="cfg", mode="auto", scale=2.0, negative=neg)
    assert atg.engine.mode == "swap" and cfg.engine.mode == "additive"
    same = node(env, "GFCGCombiner", gfcg=g, combine_with="autoguidance", mode="swap", scale=2.0, guide_model=guide)
    assert torch.equal(sample(atg), sample(same))
    spec = env["reg"]["GFCGCombiner"].GET_NODE_INFO_V1()["input"]["required"]["mode"]
    assert spec[1]["default"] == "auto" and "negative prompt" in spec[1]["tooltip"]
