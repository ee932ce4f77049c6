"""ComfyUI integration: the pack loaded into ComfyUI's node registry, guiders run through
SamplerCustomAdvanced on CPU with a tiny class-conditional model and a tiny timm classifier."""
import asyncio

import pytest
import torch

from conftest import node, sample  # the env fixture lives in conftest

pytestmark = pytest.mark.comfy


GFCG_DEFAULTS = dict(desired_class="3", tau=0.5, alpha=2.0, beta=1.0, window_start=0.0, window_end=1.0, period=1,
                     reference="deterministic")


def gfcg(env, model, positive, **over):
    kw = dict(GFCG_DEFAULTS, **over)
    return node(env, "GFCGGuider", model=model, positive=positive, classifier=env["clf"], **kw)


# ------------------------------------------------------------------ registry, schema, docs
def test_nodes_registered_with_descriptions_and_tooltips(env):
    for name in ("GFCGLoadImageClassifier", "GFCGGuider", "GFCGCombiner"):
        cls = env["reg"][name]
        info = cls.GET_NODE_INFO_V1()
        assert info["description"].strip(), name
        for section in ("required", "optional"):
            for inp, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip") if len(spec) > 1 else False, f"{name}.{inp} has no tooltip"


# ------------------------------------------------------------------ tau = 0 identities
def test_tau0_gfcg_equals_plain_conditional(env):
    from comfy_extras.nodes_custom_sampler import Guider_Basic

    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos = cm.label_cond(3)
    basic = Guider_Basic(m)
    basic.set_conds(pos)
    ref = sample(basic)
    out = sample(gfcg(env, m, pos, tau=0.0))
    assert torch.equal(out, ref)
    assert not torch.equal(sample(gfcg(env, m, pos, tau=1.0)), ref)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_tau0_gfcg_cfg_additive_equals_cfg_guider(env, sampler):
    import comfy.samplers

    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos, neg = cm.label_cond(3), cm.label_cond(None)
    g = comfy.samplers.CFGGuider(m)
    g.set_conds(pos, neg)
    g.set_cfg(4.0)
    ref = sample(g, sampler=sampler)
    comb = node(env, "GFCGCombiner", gfcg=gfcg(env, m, pos, tau=0.0), combine_with="cfg", mode="additive", scale=4.0,
                negative=neg)
    assert torch.equal(sample(comb, sampler=sampler), ref)


class PlainAutoguidance:
    """Test-side reference: D = G + w (D1 - G), guide model with its own processed conds."""

    @staticmethod
    def make(main, guide, positive, w):
        import comfy.samplers

        class _G(comfy.samplers.CFGGuider):
            def inner_sample(self, *args, **kwargs):   # any ComfyUI's calling convention
                from comfyui_gfcg.guiders.callconv import named_arguments

                a = named_arguments(comfy.samplers.CFGGuider.inner_sample, args, kwargs)
                conds = {"positive": [c.copy() for c in self.original_conds["positive"]]}
                self.gc = comfy.samplers.process_conds(guide.model, a["noise"], conds, a["device"], None,
                                                       a["denoise_mask"], a["seed"])
                guide.pre_run()
                return super().inner_sample(*args, **kwargs)

            def predict_noise(self, x, t, model_options={}, seed=None):
                d1 = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["positive"]], x, t, model_options)[0]
                g = comfy.samplers.calc_cond_batch(guide.model, [self.gc["positive"]], x, t, model_options)[0]
                return g + (d1 - g) * w

        mp = main.clone()
        mp.set_additional_models("test_guide", [guide])
        gd = _G(mp)
        gd.inner_set_conds({"positive": positive})
        return gd


def test_tau0_gfcg_atg_additive_equals_plain_autoguidance(env):
    cm = env["cm"]
    m, _ = cm.tiny_model(seed=0)
    weak, _ = cm.tiny_model(seed=1, width=8)
    pos = cm.label_cond(3)
    ref = sample(PlainAutoguidance.make(m, weak, pos, 2.5))
    comb = node(env, "GFCGCombiner", gfcg=gfcg(env, m, pos, tau=0.0), combine_with="autoguidance", mode="additive",
                scale=2.5, guide_model=weak)
    assert torch.equal(sample(comb), ref)


# ------------------------------------------------------------------ every guider, several samplers
@pytest.mark.parametrize("combine,mode", [("none", None), ("cfg", "additive"), ("cfg", "swap"),
                                          ("autoguidance", "additive"), ("autoguidance", "swap")])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_cfg_pp", "dpmpp_2s_ancestral"])
def test_each_guider_each_sampler(env, combine, mode, sampler):
    cm = env["cm"]
    m, _ = cm.tiny_model(seed=0)
    pos = cm.label_cond(3)
    g = gfcg(env, m, pos, tau=1.0)
    if combine == "cfg":
        g = node(env, "GFCGCombiner", gfcg=g, combine_with="cfg", mode=mode, scale=3.0, negative=cm.label_cond(None))
    elif combine == "autoguidance":
        weak, _ = cm.tiny_model(seed=1, width=8)
        g = node(env, "GFCGCombiner", gfcg=g, combine_with="autoguidance", mode=mode, scale=2.0, guide_model=weak)
    out = sample(g, sampler=sampler, steps=4)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    assert len(g.engine.trace) == 4                       # one decision per step, whatever the sampler
    assert [t.step for t in g.engine.trace] == [0, 1, 2, 3]


def test_heun_and_euler_decide_at_the_same_sigmas(env):
    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos = cm.label_cond(3)
    sig = {}
    for sampler in ("euler", "heun"):
        g = gfcg(env, m, pos, tau=1.0, period=2, window_start=0.1, window_end=0.9)
        sample(g, sampler=sampler, steps=10)
        sig[sampler] = [(t.step, round(t.sigma, 5)) for t in g.engine.trace]
    import comfy.samplers

    from comfyui_gfcg.guiders.schedule import classifier_steps, window_steps

    assert sig["euler"] == sig["heun"]
    # the window is keyed to the model's noise range (percent_to_sigma), as ComfyUI's start/end percent
    ms = m.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", 10).tolist()
    window = window_steps(sigmas, 0.1, 0.9, ms.percent_to_sigma)
    assert [s for s, _ in sig["euler"]] == classifier_steps(10, 0.1, 0.9, 2, window) == [2, 4, 6, 8]


# ------------------------------------------------------------------ forward counting / batching
class RowClassifier(torch.nn.Module):
    """Classifier test double: sample i is confident in class 3 when i is even, confused (runner-up 5) when odd."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b = x.shape[0]
        logits = torch.full((b, 10), -10.0, device=x.device)
        for i in range(b):
            logits[i, 3] = 10.0 if i % 2 == 0 else 0.0
            logits[i, 5] = 1.0
        return logits + self.w


def row_classifier():
    from comfyui_gfcg.classifiers.comfy_classifier import ComfyClassifier
    from comfyui_gfcg.classifiers.timm_classifier import DataConfig, ImageClassifier

    return ComfyClassifier(ImageClassifier(RowClassifier(), DataConfig(input_size=(3, 16, 16), crop_pct=1.0),
                                           [f"c{i}" for i in range(10)]))


@pytest.mark.parametrize("combine,mode,classify_input,per_eval", [
    # (main-model forwards per evaluation, rows in them) for batch 4 with samples 1 and 3 confused
    ("none", None, "current", [[4, 2]]),
    ("none", None, "previous", [[4 + 2]]),
    ("cfg", "additive", "current", [[8, 2]]),
    ("cfg", "additive", "previous", [[8 + 2]]),
    ("cfg", "swap", "current", [[4, 2 + 2]]),       # the negative waits for the decision: 8 rows, as CFG
    ("cfg", "swap", "previous", [[4 + 2 + 2]]),
    ("autoguidance", "swap", "previous", [[4]]),
    ("autoguidance", "additive", "previous", [[4 + 2]]),
])
def test_forward_count_and_rows(env, combine, mode, classify_input, per_eval):
    cm = env["cm"]
    m, net = cm.tiny_model()
    weak, wnet = cm.tiny_model(seed=1, width=8)
    pos = cm.label_cond(3)
    g = node(env, "GFCGGuider", model=m, positive=pos, classifier=row_classifier(),
             **dict(GFCG_DEFAULTS, classify_input=classify_input))
    if combine == "cfg":
        g = node(env, "GFCGCombiner", gfcg=g, combine_with="cfg", mode=mode, scale=3.0, negative=cm.label_cond(None))
    elif combine == "autoguidance":
        g = node(env, "GFCGCombiner", gfcg=g, combine_with="autoguidance", mode=mode, scale=2.0, guide_model=weak)
    sample(g, steps=3, batch=4)
    calls = net.calls
    if classify_input == "previous":
        # evaluation 1 classifies its own D1 (no previous estimate yet); 2 and 3 are one forward each
        assert calls[-2:] == per_eval[0] * 2
    else:
        assert calls == per_eval[0] * 3
    if combine == "autoguidance":
        expect = [4] * 3                                    # one guide forward per evaluation, batch rows
        assert wnet.calls == expect


def test_no_reference_branch_when_all_confident(env):
    cm = env["cm"]
    m, net = cm.tiny_model()
    pos = cm.label_cond(3)
    neg = cm.label_cond(None)
    g = node(env, "GFCGGuider", model=m, positive=pos, classifier=row_classifier(), **GFCG_DEFAULTS)
    g = node(env, "GFCGCombiner", gfcg=g, combine_with="cfg", mode="additive", scale=3.0, negative=neg)
    sample(g, steps=3, batch=1)                         # the single sample (row 0) is confident
    assert net.calls == [2, 2, 2]                         # D1 + D_neg in one forward, nothing else


# ------------------------------------------------------------------ determinism
def test_same_seed_same_output_stochastic_included(env):
    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos = cm.label_cond(3)
    outs = [sample(gfcg(env, m, pos, tau=1.0, reference="stochastic"), seed=s, batch=4) for s in (11, 11, 12)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


# ------------------------------------------------------------------ post-CFG hooks (CFG++ samplers)
def test_post_cfg_hooks_see_cond_and_uncond(env):
    cm = env["cm"]
    m, _ = cm.tiny_model()
    seen = []

    def hook(args):
        seen.append((args["cond_denoised"].shape, args["uncond_denoised"].shape, args["cond_scale"]))
        return args["denoised"]

    m2 = m.clone()
    m2.set_model_sampler_post_cfg_function(hook)
    g = node(env, "GFCGCombiner", gfcg=gfcg(env, m2, cm.label_cond(3), tau=1.0), combine_with="cfg", mode="additive",
             scale=3.0, negative=cm.label_cond(None))
    sample(g, steps=3)
    assert len(seen) == 3 and seen[0][2] == 3.0


# ------------------------------------------------------------------ bad inputs
def _validate(prompt):
    import execution

    return asyncio.run(execution.validate_prompt("test", prompt, None))


def _prompt(loader=None, guider=None):
    loader = loader or {"classifier_name": "tiny_resnet.safetensors", "architecture": ""}
    g = dict(GFCG_DEFAULTS, model=["m", 0], positive=["p", 0], classifier=["c", 0])
    g.update(guider or {})
    return {
        "m": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        "p": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["m", 1]}},
        "c": {"class_type": "GFCGLoadImageClassifier", "inputs": loader},
        "g": {"class_type": "GFCGGuider", "inputs": g},
        "s": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["n", 0], "guider": ["g", 0], "sampler": ["k", 0],
                                                               "sigmas": ["sg", 0], "latent_image": ["l", 0]}},
        "n": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "k": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sg": {"class_type": "BasicScheduler", "inputs": {"model": ["m", 0], "scheduler": "karras", "steps": 4, "denoise": 1.0}},
        "l": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "o": {"class_type": "PreviewImage", "inputs": {"images": ["d", 0]}},
        "d": {"class_type": "VAEDecode", "inputs": {"samples": ["s", 0], "vae": ["m", 2]}},
    }


def _errors_of(result, node_id):
    ok, err, outputs, node_errors = result
    return " ".join(f"{e.get('message')} {e.get('details')}" for e in node_errors.get(node_id, {}).get("errors", []))


@pytest.mark.parametrize("guider,needle", [
    ({"tau": 1.5}, "tau"), ({"tau": -0.5}, "tau"), ({"alpha": -1.0}, "alpha"), ({"period": 0}, "period"),
    ({"window_start": 0.8, "window_end": 0.2}, "window_start (0.8) must be smaller than window_end"),
    ({"desired_class": ""}, "desired_class"), ({"desired_class": "-3"}, "desired_class"),
])
def test_bad_guider_inputs_fail_validation_naming_the_input(env, guider, needle):
    res = _validate(_prompt(guider=guider))
    assert needle in _errors_of(res, "g"), res


@pytest.mark.parametrize("loader,needle", [
    ({"classifier_name": "missing.safetensors", "architecture": ""}, "classifier_name"),
    ({"classifier_name": "no_arch.safetensors", "architecture": ""}, "architecture"),
])
def test_bad_classifier_file_fails_validation(env, loader, needle):
    res = _validate(_prompt(loader=loader))
    assert needle in _errors_of(res, "c"), res


def test_no_arch_file_loads_when_architecture_given(env):
    clf = node(env, "GFCGLoadImageClassifier", classifier_name="no_arch.safetensors", architecture="test_resnet")
    assert clf.classifier.num_classes == 10


@pytest.mark.parametrize("over,needle", [
    ({"desired_class": "12"}, "desired_class: class index 12 is out of range; this classifier has 10 classes"),
    ({"desired_class": "shpe 3"}, "desired_class: unknown class name 'shpe 3'"),
    ({"reference": "fixed", "fixed_reference_class": "3"}, "fixed_reference"),
])
def test_bad_class_at_execution_names_the_input(env, over, needle):
    cm = env["cm"]
    m, _ = cm.tiny_model()
    with pytest.raises(ValueError, match=needle):
        gfcg(env, m, cm.label_cond(3), **over)


def test_class_by_name_and_synonym(env):
    cm = env["cm"]
    m, _ = cm.tiny_model()
    assert gfcg(env, m, cm.label_cond(3), desired_class="shape 7").engine.config.desired_class == 7
    assert gfcg(env, m, cm.label_cond(3), desired_class="S4").engine.config.desired_class == 4


def test_combiner_needs_its_inputs(env):
    cm = env["cm"]
    m, _ = cm.tiny_model()
    g = gfcg(env, m, cm.label_cond(3))
    with pytest.raises(ValueError, match="negative"):
        node(env, "GFCGCombiner", gfcg=g, combine_with="cfg", mode="additive", scale=3.0)
    with pytest.raises(ValueError, match="guide_model"):
        node(env, "GFCGCombiner", gfcg=g, combine_with="autoguidance", mode="additive", scale=3.0)
    with pytest.raises(ValueError, match="guide_model: it is the same network"):
        node(env, "GFCGCombiner", gfcg=g, combine_with="autoguidance", mode="swap", scale=3.0, guide_model=m.clone())


# ------------------------------------------------------------------ latent models: x0 decoded by the VAE
def test_latent_model_decodes_with_vae_for_the_classifier(env):
    cm = env["cm"]
    m, _ = cm.tiny_model(latent=True)
    vae = cm.taesd_vae()
    seen = []
    clf = env["clf"]
    orig = clf.classifier.preprocess

    def spy(images):
        seen.append(tuple(images.shape))
        return orig(images)

    clf.classifier.preprocess = spy
    try:
        g = gfcg(env, m, cm.label_cond(3), tau=1.0, vae=vae, decode_resolution=1.0)   # full size (0 = auto: 32 px)
        out = sample(g, steps=3, channels=4, size=8)
    finally:
        clf.classifier.preprocess = orig
    assert torch.isfinite(out).all() and out.shape == (2, 4, 8, 8)
    assert seen and seen[0] == (2, 3, 64, 64)               # decoded pixels, 8x the latent size
    p = [v for e in g.engine.trace for v in e.p_des]
    assert p and all(0.0 <= v <= 1.0 for v in p), p        # the classifier saw real pixels (no NaN)
    assert any(r >= 0 for e in g.engine.trace for r in e.reference)  # tau = 1: samples were guided


def test_latent_model_without_vae_is_a_clear_error(env):
    cm = env["cm"]
    m, _ = cm.tiny_model(latent=True)
    with pytest.raises(ValueError, match="vae: the model makes 4-channel latents"):
        sample(gfcg(env, m, cm.label_cond(3), tau=1.0), steps=2, channels=4, size=8)


def test_pixel_model_with_latent_vae_is_a_clear_error(env):
    cm = env["cm"]
    m, _ = cm.tiny_model()
    with pytest.raises(ValueError, match=r"vae: the model works in pixel space \(3 channels\) but this VAE makes "
                                         "4-channel latents"):
        gfcg(env, m, cm.label_cond(3), tau=1.0, vae=cm.taesd_vae())   # refused when the node runs


# ------------------------------------------------------------------ model management and every sampler
def test_classifier_vae_and_guide_load_with_the_model(env):
    import comfy.model_management as mm

    cm = env["cm"]
    m, _ = cm.tiny_model()
    weak, _ = cm.tiny_model(seed=1, width=8)
    vae = cm.pixel_vae()
    g = node(env, "GFCGCombiner", gfcg=gfcg(env, m, cm.label_cond(3), tau=1.0, vae=vae), combine_with="autoguidance",
             mode="swap", scale=2.0, guide_model=weak)
    extra = g.model_patcher.get_nested_additional_models()
    assert env["clf"].patcher in extra and weak in extra
    assert vae.patcher not in extra          # the pixel_space VAE decodes nothing: pixel x0 is shown as it is
    sample(g, steps=2)
    loaded = mm.loaded_models()
    assert any(p is env["clf"].patcher for p in loaded) and any(p is weak for p in loaded)
    assert weak.model.current_patcher is None               # the guide model was cleaned up after sampling


def test_every_builtin_sampler_runs(env):
    import comfy.samplers

    cm = env["cm"]
    m, _ = cm.tiny_model()
    failures = {}
    for name in comfy.samplers.KSampler.SAMPLERS:
        g = node(env, "GFCGCombiner", gfcg=gfcg(env, m, cm.label_cond(3), tau=1.0), combine_with="cfg", mode="swap",
                 scale=3.0, negative=cm.label_cond(None))
        try:
            out = sample(g, sampler=name, steps=3, batch=2, size=8)
            if not torch.isfinite(out).all():
                failures[name] = "non-finite output"
        except Exception as e:  # collect all, report together
            failures[name] = repr(e)[:200]
    assert not failures, failures


def test_multigpu_split_keeps_to_the_main_model(env):
    """ComfyUI's MultiGPU CFG Split (v0.33+) describes the MAIN model's per-GPU clones: the guide's
    evaluations run without them, a guide's own clones are not joined to the main model's split,
    and the classifier can be cloned per GPU (its patcher names a factory, as core loaders do)."""
    from comfyui_gfcg.guiders.comfy_forward import guide_options, single_device

    opts = {"transformer_options": {}, "multigpu_clones": {"cuda:1": object()}, "multigpu_thread_pool": object()}
    assert guide_options(opts) == {"transformer_options": {}} and "multigpu_clones" in opts
    plain = {"transformer_options": {}}
    assert guide_options(plain) is plain
    cm = env["cm"]
    weak, _ = cm.tiny_model(seed=1, width=8)
    assert single_device(weak) is weak
    split = weak.clone()
    split.set_additional_models("multigpu", [weak.clone()])
    guide = single_device(split)
    assert guide.get_additional_models_with_key("multigpu") == [] and split.get_additional_models_with_key("multigpu")
    clf = env["clf"]
    fn, args = clf.patcher.cached_patcher_init[:2]
    copy = fn(*args, disable_dynamic=True)
    assert copy.model is not clf.patcher.model
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(copy.model(x), clf.patcher.model(x))
