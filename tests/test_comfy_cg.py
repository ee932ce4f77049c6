"""ComfyUI integration of the off-the-shelf gradient classifier guider: in-process through
SamplerCustomAdvanced (under torch.inference_mode(), as ComfyUI runs nodes), and over HTTP."""
import gc
import json

import pytest
import torch

from conftest import REPO, api_post, api_wait, node, sample

pytestmark = pytest.mark.comfy

CG = dict(desired_class="3", scale=0.05, gamma=0.3, softplus_beta=5.0, tau1=1.0, tau2=0.0,
          classifier_input="denoised", cfg=1.0)


def cg(env, model, positive, **over):
    return node(env, "GFCGClassifierGuidance", model=model, positive=positive, classifier=env["clf"],
                **dict(CG, **over))


def _grad_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o) and (o.requires_grad or o.grad_fn is not None))


def test_node_schema_has_description_and_tooltips(env):
    info = env["reg"]["GFCGClassifierGuidance"].GET_NODE_INFO_V1()
    assert "2310.11311" in info["description"]
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), name


def test_scale0_equals_plain_guiders_bit_for_bit(env):
    """s = 0: the conditional model alone (BasicGuider), and with cfg + negative ComfyUI's CFGGuider."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_Basic

    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos, neg = cm.label_cond(3), cm.label_cond(None)
    basic = Guider_Basic(m)
    basic.set_conds(pos)
    assert torch.equal(sample(cg(env, m, pos, scale=0.0)), sample(basic))
    cfgg = comfy.samplers.CFGGuider(m)
    cfgg.set_conds(pos, neg)
    cfgg.set_cfg(2.5)
    assert torch.equal(sample(cg(env, m, pos, scale=0.0, cfg=2.5, negative=neg)), sample(cfgg))


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_guidance_runs_with_gradients_inside_inference_mode(env, sampler):
    cm = env["cm"]
    m, net = cm.tiny_model()
    pos = cm.label_cond(3)
    before = _grad_tensors()
    guided = sample(cg(env, m, pos), sampler=sampler)
    plain = sample(cg(env, m, pos, scale=0.0), sampler=sampler)
    assert torch.isfinite(guided).all()
    assert (guided - plain).abs().max() > 1e-3          # the gradient term moved the samples
    assert _grad_tensors() <= before                    # no autograd graph or grad tensor survives a run


def test_cg_trace_records_each_evaluation(env):
    cm = env["cm"]
    m, _ = cm.tiny_model()
    g = cg(env, m, cm.label_cond(3))
    sample(g, steps=4, sampler="euler")
    tr = g.engine.trace
    assert [t.step for t in tr] == [0, 1, 2, 3]
    assert tr[0].weight == pytest.approx(0.05) and all(0.0 <= p <= 1.0 for t in tr for p in t.p_des)


def test_bad_inputs_name_the_input(env):
    cm = env["cm"]
    m, _ = cm.tiny_model()
    with pytest.raises(ValueError, match="negative"):
        cg(env, m, cm.label_cond(3), cfg=3.0)
    with pytest.raises(ValueError, match="desired_class"):
        cg(env, m, cm.label_cond(3), desired_class="no such class")
    m2, _ = cm.tiny_model(latent=True)
    import folder_paths
    if any(f.startswith("taesd_decoder") for f in folder_paths.get_filename_list("vae_approx")):
        pytest.skip("a taesd_decoder is installed in this ComfyUI")
    with pytest.raises(ValueError, match="decode: taesd needs"):
        sample(cg(env, m2, cm.label_cond(3), vae=cm.taesd_vae(), decode="taesd"), channels=4, size=8, steps=1)


@pytest.mark.parametrize("decode", ["vae", "latent_rgb", "taesd"])
def test_latent_model_gradient_flows_through_each_decoder(env, decode, tmp_path_factory):
    """A latent model: the classifier sees the decoded estimate and the gradient comes back
    through the (random-weight TAESD-architecture) VAE decoder, ComfyUI's TAESD from
    models/vae_approx, or the latent-to-RGB factors."""
    cm = env["cm"]
    if decode == "taesd":
        from comfyui_gfcg.testbed.decode_bench import taesd_file

        taesd_file(str(tmp_path_factory.mktemp("vae_approx")))      # random weights, registered in vae_approx
    m, _ = cm.tiny_model(latent=True)
    pos = cm.label_cond(3)
    vae = cm.taesd_vae()
    guided = sample(cg(env, m, pos, vae=vae, decode=decode, decode_resolution=1.0), channels=4, size=8)
    plain = sample(cg(env, m, pos, vae=vae, decode=decode, decode_resolution=1.0, scale=0.0), channels=4, size=8)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4
    half = sample(cg(env, m, pos, vae=vae, decode=decode, decode_resolution=0.5), channels=4, size=8)
    assert torch.isfinite(half).all() and not torch.equal(half, guided)


# ------------------------------------------------------------------ through ComfyUI's server
def _cg_prompt(seed, steps=18, batch=4):
    """The testbed workflow's models with the gradient guider in place of GFCG + autoguidance."""
    api = json.loads((REPO / "workflows" / "api" / "testbed_gfcg_atg.json").read_text())
    p = {k: v for k, v in api.items() if k in ("1", "3", "4", "5", "9", "10", "11")}
    for v in p.values():
        v.pop("_meta", None)
    p["5"]["inputs"]["batch_size"] = batch
    p["10"]["inputs"]["steps"] = steps
    p["6"] = {"class_type": "GFCGClassifierGuidance",
              "inputs": {"model": ["1", 0], "positive": ["4", 0], "classifier": ["3", 0], **CG,
                         "desired_class": "triangle up", "scale": 0.02}}
    p["8"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
    p["11"]["inputs"]["guider"] = ["6", 0]
    p["99"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "gfcg_cg"}}
    return p


def _rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_http_run_matches_headless_sampler_and_memory_stays_flat(server):
    """Gradient guidance inside ComfyUI's execution (HTTP /prompt), equal to the headless testbed
    sampler on the same noise and sigmas; then 20 runs with the server's memory flat."""
    from safetensors.torch import load_file

    from comfyui_gfcg.guiders.gradient import CGConfig, softplus_copy
    from comfyui_gfcg.testbed.models import load_testbed
    from comfyui_gfcg.testbed.sampler import sample as headless
    from test_comfy_testbed import _comfy_sigmas

    url, _, base = server
    pid = int((base / "server.pid").read_text())
    pr = _cg_prompt(7)
    h = api_wait(url, api_post(url, "/prompt", {"prompt": pr})["prompt_id"])
    assert h["status"]["status_str"] == "success", h["status"]
    lat = h["outputs"]["99"]["latents"][0]
    comfy_x = load_file(str(base / "out" / lat["subfolder"] / lat["filename"]))["latent_tensor"].float()
    tb = load_testbed("float32")
    clf, _ = softplus_copy(tb.guidance_classifier, 5.0)
    r = headless(tb.main, clf, "cg", 6, 4, seed=7, cg=CGConfig(desired_class=6, scale=0.02), sigmas=_comfy_sigmas(18))
    diff = (comfy_x - r.images).abs().max().item()
    print(f"max |ComfyUI - headless| = {diff:.3g}")
    assert diff < 1e-3

    rss = []
    for i in range(20):
        h = api_wait(url, api_post(url, "/prompt", {"prompt": _cg_prompt(100 + i, steps=8)})["prompt_id"])
        assert h["status"]["status_str"] == "success", h["status"]
        rss.append(_rss_mb(pid))
    growth = max(rss[5:]) - rss[4]
    print("server RSS (MB) over 20 runs:", [round(v) for v in rss])
    # an autograd graph or classifier copy kept per run would add megabytes per run (the Softplus
    # copy of the guidance classifier alone is ~9 MB); allocator noise stays well below 24 MB
    assert growth < 24, rss


@pytest.mark.parametrize("fmt_name", ["SD15", "SDXL", "EDM2", "Flux2"])
def test_latent_rgb_decode_matches_comfyui_previewer(env, fmt_name):
    """decode = latent_rgb shows the classifier what ComfyUI's latent-to-RGB preview shows, formats
    with a reshape of the latents first (Flux2's 128 channels, ComfyUI v0.33+) included."""
    import inspect

    import numpy as np

    import comfy.latent_formats
    import latent_preview

    from comfyui_gfcg.edm2.comfy_model import EDM2LatentFormat
    from comfyui_gfcg.guiders.comfy_decode import PixelDecoder

    if fmt_name != "EDM2" and not hasattr(comfy.latent_formats, fmt_name):
        pytest.skip(f"this ComfyUI has no {fmt_name} latent format")
    fmt = EDM2LatentFormat() if fmt_name == "EDM2" else getattr(comfy.latent_formats, fmt_name)()

    class Model:
        latent_format = fmt

        @staticmethod
        def process_latent_out(x):
            return fmt.process_out(x)

    c = fmt.latent_channels
    x0 = torch.randn(2, c, 8, 8) * 0.8
    vae = env["cm"].taesd_vae()
    vae.latent_channels = c            # only its channel count is read for latent_rgb
    ours = PixelDecoder(vae, "latent_rgb")(Model, x0)[0].permute(1, 2, 0)   # [H, W, 3]
    reshape = getattr(fmt, "latent_rgb_factors_reshape", None)
    if fmt_name == "Flux2":
        assert reshape is not None and ours.shape[:2] == (16, 16)   # un-patchified: twice the side
    extra = ({"latent_rgb_factors_reshape": reshape}
             if "latent_rgb_factors_reshape" in inspect.signature(latent_preview.Latent2RGBPreviewer).parameters else {})
    prev = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, getattr(fmt, "latent_rgb_factors_bias", None),
                                              **extra)
    theirs = torch.from_numpy(np.asarray(prev.decode_latent_to_preview(x0))).float() / 255
    assert (ours - theirs).abs().max() <= 1.01 / 255        # equal up to the preview's uint8 rounding
