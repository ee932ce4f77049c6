"""EDM2 in ComfyUI (CPU): small random-weight EDM2 networks, written as NVlabs pickles, load through
the pack's node and sample with KSampler (heun, karras, 32 steps) and SamplerCustomAdvanced (CFG,
GFCG, GFCG + autoguidance with an EDM2 guide); cond and uncond share one forward."""
import pytest
import torch

import edm2_helpers as H
from conftest import load_comfy, tol

pytestmark = pytest.mark.comfy

EDM2_NODE_IDS = ["GFCGLoadEDM2Model", "GFCGEDM2ClassLabel", "GFCGEDM2EmptyLatent", "GFCGEDM2VAEDecode",
                 "GFCGEDM2VAEEncode"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    st = load_comfy()
    import folder_paths

    import comfy_models as cm

    root = tmp_path_factory.mktemp("models")
    edm2_dir, dm_dir, clf_dir = root / "edm2", root / "diffusion_models", root / "classifiers"
    for d in (edm2_dir, dm_dir, clf_dir):
        d.mkdir()
    files = {}
    for name, family, label_dim, seed in [("edm2-img512-tiny", "img512", 1000, 0), ("edm2-img512-guide", "img512", 1000, 1),
                                          ("edm2-img512-uncond", "img512", 0, 2), ("edm2-img64-tiny", "img64", 1000, 3)]:
        cfg = H.small_cfg(family, label_dim)
        sd = H.random_state_dict(cfg, seed)
        (edm2_dir / f"{name}.pkl").write_bytes(H.nvlabs_pickle_bytes(cfg, sd, root / "SENTINEL",
                                                                     "stability" if family == "img512" else "rgb"))
        files[name] = dict(cfg=cfg, sd=sd)
    # a copy in diffusion_models (listed because its name contains 'edm2'), and an unrelated file (not listed)
    (dm_dir / "my-edm2-copy.pkl").write_bytes((edm2_dir / "edm2-img512-tiny.pkl").read_bytes())
    (dm_dir / "flux-something.safetensors").write_bytes(b"")
    (edm2_dir / "edm2-evil.pkl").write_bytes(b"cos\nsystem\n(S'touch " + str(root / "SENTINEL").encode() + b"'\ntR.")
    folder_paths.add_model_folder_path("edm2", str(edm2_dir))
    folder_paths.add_model_folder_path("diffusion_models", str(dm_dir))
    cm.save_classifier(str(clf_dir), name="tiny_resnet_1k.safetensors", classes=1000)
    folder_paths.add_model_folder_path("gfcg_classifiers", str(clf_dir))
    reg = st["nodes"].NODE_CLASS_MAPPINGS
    return dict(reg=reg, cm=cm, files=files, root=root)


def node(env, name, **kw):
    return env["reg"][name].execute(**kw).result[0]


def load(env, name, dtype="default"):
    return node(env, "GFCGLoadEDM2Model", ckpt_name=f"{name}.pkl", weight_dtype=dtype)


def count_forwards(patcher):
    """Record the batch size of every EDM2 network forward."""
    net = patcher.model.diffusion_model.net
    calls = []
    orig = net.unet.forward

    def wrapped(x, *a, **k):
        calls.append(x.shape[0])
        return orig(x, *a, **k)

    net.unet.forward = wrapped
    return calls


def test_nodes_registered_with_descriptions_and_tooltips(env):
    for name in EDM2_NODE_IDS:
        info = env["reg"][name].GET_NODE_INFO_V1()
        assert info["description"].strip(), name
        for section in ("required", "optional"):
            for inp, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), (name, inp)
        assert all(t for t in info["output_tooltips"]), name


def test_checkpoint_listing(env):
    from comfyui_gfcg.edm2.comfy_model import list_checkpoints

    names = list_checkpoints()
    assert "edm2-img512-tiny.pkl" in names and "my-edm2-copy.pkl" in names
    assert "flux-something.safetensors" not in names


def test_loaded_model_is_edm_with_edm2_sigmas_and_formula(env):
    patcher = load(env, "edm2-img512-tiny")
    ms = patcher.get_model_object("model_sampling")
    assert float(ms.sigma_min) == pytest.approx(0.002) and float(ms.sigma_max) == pytest.approx(80.0)
    assert ms.sigma_data == 0.5
    model = patcher.model
    f = env["files"]["edm2-img512-tiny"]
    x = torch.randn(2, 4, 16, 16)
    y = torch.zeros(2, 1000)
    y[0, 5] = y[1, 9] = 1
    sigma = torch.tensor([0.7, 12.0])
    xs = x * sigma.view(-1, 1, 1, 1)
    with torch.inference_mode():
        got = model.apply_model(xs, sigma, y=y)
    # on CUDA ComfyUI runs the net in half precision
    torch.testing.assert_close(got.cpu().float(), H.reference_denoiser(f["sd"], f["cfg"], xs, sigma, y),
                               rtol=tol(1e-5, 1e-2), atol=tol(2e-4, 1e-2))
    # latent format: raw SD latents <-> EDM2 space; the empty latent is exactly 0 in model space
    lf = model.latent_format
    empty = node(env, "GFCGEDM2EmptyLatent", family="img512", batch_size=3)["samples"]
    assert empty.shape == (3, 4, 64, 64)
    assert lf.process_in(empty).abs().max() < 1e-6
    z = torch.randn(1, 4, 8, 8) * 4
    torch.testing.assert_close(lf.process_out(lf.process_in(z)), z, rtol=1e-5, atol=1e-5)
    assert node(env, "GFCGEDM2EmptyLatent", family="img64", batch_size=2)["samples"].shape == (2, 3, 64, 64)


def test_ksampler_heun_karras_32_steps_cond_and_uncond_in_one_forward(env):
    import nodes as comfy_nodes

    patcher = load(env, "edm2-img512-tiny")
    calls = count_forwards(patcher)
    pos = node(env, "GFCGEDM2ClassLabel", class_name="golden retriever")
    neg = node(env, "GFCGEDM2ClassLabel", class_name="goldfish")
    assert pos[0][1]["class_labels"].shape == (1, 1000) and pos[0][1]["class_labels"][0, 207] == 1
    latent = {"samples": torch.zeros(2, 4, 16, 16)}
    with torch.inference_mode():
        out = comfy_nodes.KSampler().sample(patcher, 7, 32, 2.0, "heun", "karras", pos, neg, latent, denoise=1.0)[0]
    s = out["samples"]
    assert s.shape == (2, 4, 16, 16) and torch.isfinite(s).all()
    assert len(calls) == 63, calls  # heun: 31 steps x 2 + final Euler
    assert set(calls) == {4}, calls  # 2 images x (cond + uncond) per forward
    # cfg 1: only the conditional branch runs
    calls.clear()
    with torch.inference_mode():
        comfy_nodes.KSampler().sample(patcher, 7, 8, 1.0, "heun", "karras", pos, neg, latent, denoise=1.0)
    assert set(calls) == {2}


def test_sampler_custom_advanced_cfg_gfcg_and_autoguidance(env):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    main, guide = load(env, "edm2-img512-tiny"), load(env, "edm2-img512-guide")
    calls_main, calls_guide = count_forwards(main), count_forwards(guide)
    pos = node(env, "GFCGEDM2ClassLabel", class_name="3")
    neg = node(env, "GFCGEDM2ClassLabel", class_name="")
    clf = node(env, "GFCGLoadImageClassifier", classifier_name="tiny_resnet_1k.safetensors", architecture="")
    vae = env["cm"].taesd_vae()
    sigmas = comfy.samplers.calculate_sigmas(main.get_model_object("model_sampling"), "karras", 8)
    latent = {"samples": torch.zeros(2, 4, 16, 16)}

    def run(guider):
        with torch.inference_mode():
            out, _ = SamplerCustomAdvanced().sample(Noise_RandomNoise(3), guider, comfy.samplers.sampler_object("heun"),
                                                    sigmas, latent)
        assert torch.isfinite(out["samples"]).all()
        return out["samples"]

    cfg = comfy.samplers.CFGGuider(main)
    cfg.set_conds(pos, neg)
    cfg.set_cfg(1.5)
    run(cfg)
    assert set(calls_main) == {4} and len(calls_main) == 15
    calls_main.clear()

    gfcg = node(env, "GFCGGuider", model=main, positive=pos, classifier=clf, desired_class="3", tau=1.0, alpha=2.0,
                beta=1.0, window_start=0.0, window_end=1.0, period=1, reference="deterministic", vae=vae)
    a = run(gfcg)
    # tau = 1: every sample is guided. At a step's first evaluation D1 comes first (the classifier needs
    # it), then D_ref in a second forward; at Heun's corrector D1 and D_ref share one forward of 4 rows.
    decided = [e for e in gfcg.engine.trace if any(r >= 0 for r in e.reference)]
    assert decided and all(0 <= p <= 1 for e in decided for p in e.p_des)
    assert len(calls_main) == 15 + len(decided) and set(calls_main) == {2, 4}, calls_main
    calls_main.clear()
    comb = node(env, "GFCGCombiner", gfcg=gfcg, combine_with="autoguidance", mode="additive", scale=2.0,
                guide_model=guide)
    b = run(comb)
    assert len(calls_guide) == 15 and set(calls_guide) == {2}  # the guide: one forward per evaluation
    assert len(calls_main) == 15 + len([e for e in comb.engine.trace if any(r >= 0 for r in e.reference)])
    assert not torch.allclose(a, b)
    assert not (env["root"] / "SENTINEL").exists()


def test_img64_pixel_model_and_decode(env):
    import nodes as comfy_nodes

    patcher = load(env, "edm2-img64-tiny")
    assert patcher.model.latent_format.latent_channels == 3
    pos = node(env, "GFCGEDM2ClassLabel", class_name="tench; 1")
    assert pos[0][1]["class_labels"].shape == (2, 1000)
    latent = {"samples": torch.zeros(2, 3, 16, 16)}
    with torch.inference_mode():
        out = comfy_nodes.KSampler().sample(patcher, 1, 6, 1.0, "heun", "karras", pos, pos, latent, denoise=1.0)[0]
    x = out["samples"]
    img = node(env, "GFCGEDM2VAEDecode", samples=out, vae=env["cm"].pixel_vae())
    assert img.shape == (2, 16, 16, 3)
    torch.testing.assert_close(img, ((x + 1) / 2).clamp(0, 1).movedim(1, -1))
    stock = comfy_nodes.VAEDecode().decode(env["cm"].pixel_vae(), out)[0]
    torch.testing.assert_close(img, stock.reshape(img.shape), rtol=1e-5, atol=tol(1e-5, 2e-3))  # CUDA: half-precision VAE


def test_vae_decode_and_encode_follow_edm2_pixel_convention(env):
    import nodes as comfy_nodes

    vae = env["cm"].taesd_vae(seed=4)
    z = {"samples": torch.randn(1, 4, 8, 8)}
    stock = comfy_nodes.VAEDecode().decode(vae, z)[0]
    ours = node(env, "GFCGEDM2VAEDecode", samples=z, vae=vae)
    torch.testing.assert_close(ours, (2 * stock - 1).clamp(0, 1))
    p = torch.rand(1, 64, 64, 3)
    enc = node(env, "GFCGEDM2VAEEncode", pixels=p, vae=vae)["samples"]
    torch.testing.assert_close(enc, vae.encode((p + 1) / 2))
    # the GFCG classifier sees the same EDM2 colours as the decode node
    from comfyui_gfcg.guiders.comfy_decode import PixelDecoder

    model = load(env, "edm2-img512-tiny").model
    x0 = torch.randn(1, 4, 8, 8) * 0.5
    seen = PixelDecoder(vae)(model, x0)
    want = node(env, "GFCGEDM2VAEDecode", samples={"samples": model.process_latent_out(x0)}, vae=vae)
    torch.testing.assert_close(seen.movedim(1, -1).cpu(), want.cpu(), rtol=1e-5, atol=tol(1e-5, 5e-3))
    with pytest.raises(ValueError, match="samples: expected EDM2 latents"):
        node(env, "GFCGEDM2VAEDecode", samples={"samples": torch.zeros(1, 16, 8, 8)}, vae=vae)
    with pytest.raises(ValueError, match="vae: img512 EDM2 latents need the SD1.5 VAE"):
        node(env, "GFCGEDM2VAEDecode", samples=z, vae=env["cm"].pixel_vae())


def test_every_tensor_the_forward_uses_is_moved_by_comfy_model_loading(env):
    """ComfyUI loads (and partially loads) a model module by module: only modules that own parameters
    are moved to the GPU. Every tensor the prepared EDM2 forward reads must be in such a module; the
    gains left outside are folded into the weights and no longer read."""
    patcher = load(env, "edm2-img512-tiny")
    dm = patcher.model.diffusion_model
    # _load_list entries are tuples whose length changes between ComfyUI versions (4 at 0.3.64, 5 at 0.33);
    # the module is the one nn.Module in each
    mods = [next(v for v in e if isinstance(v, torch.nn.Module)) for e in patcher._load_list()]
    moved = {id(t) for m in mods for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))}
    left = [n for n, t in list(dm.named_parameters()) + list(dm.named_buffers()) if id(t) not in moved]
    assert all(n.endswith("emb_gain") or n.endswith("out_gain") for n in left), left
    assert not list(dm.buffers())
    net = dm.net
    for n, _ in net.named_parameters():
        if n.endswith("_gain"):
            with torch.no_grad():
                net.get_parameter(n).fill_(float("nan"))  # unused after folding: NaN must not reach the output
    with torch.inference_mode():
        d = patcher.model.apply_model(torch.randn(1, 4, 16, 16), torch.tensor([1.0]), y=torch.eye(1000)[:1])
    assert torch.isfinite(d).all()


def test_unconditional_model_ignores_labels_and_label_width_is_checked(env):
    unc = load(env, "edm2-img512-uncond").model
    assert unc.extra_conds(class_labels=torch.zeros(1, 1000)) == {}
    cond = load(env, "edm2-img512-tiny").model
    assert tuple(cond.extra_conds()["y"].cond.shape) == (1, 1000)  # zero label when none is given
    with pytest.raises(ValueError, match=r"class label has 10 entries but EDM2 model .* takes 1000 classes; set num_classes = 1000"):
        cond.extra_conds(class_labels=torch.zeros(1, 10))


def test_bad_inputs_give_clear_errors(env):
    reg = env["reg"]
    assert "ckpt_name" in reg["GFCGLoadEDM2Model"].validate_inputs("nope.pkl")
    with pytest.raises(ValueError, match=r"ckpt_name: EDM2 checkpoint 'edm2-evil.pkl' refused: .*posix.system|os.system"):
        load(env, "edm2-evil")
    assert not (env["root"] / "SENTINEL").exists()
    msg = reg["GFCGEDM2ClassLabel"].validate_inputs("not a real class")
    assert msg.startswith("class_name: unknown class name")
    assert reg["GFCGEDM2ClassLabel"].validate_inputs("1000").startswith("class_name: class index 1000 is out of range")
    assert reg["GFCGEDM2ClassLabel"].validate_inputs("1;;2").startswith("class_name: empty entry")
    assert reg["GFCGEDM2ClassLabel"].validate_inputs("") is True


def test_weight_dtypes(env):
    for dt, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        p = load(env, "edm2-img512-tiny", dt)
        assert p.model.get_dtype() == want
        with torch.inference_mode():
            d = p.model.apply_model(torch.randn(1, 4, 16, 16), torch.tensor([1.0]), y=torch.eye(1000)[:1])
        assert d.dtype == torch.float32 and torch.isfinite(d).all()


def test_latent_formats_declare_their_spatial_ratio(env):
    """ComfyUI (v0.33+) resizes an empty latent by the ratio it was made for over the model's
    format's ``spacial_downscale_ratio``: Empty Latent Image at 64 x 64 (made for x8 VAEs) becomes a
    64 x 64 pixel canvas for the img64 (pixel-space) model and stays 8 x 8 for img512 latents."""
    import inspect

    import comfy.sample
    import nodes as comfy_nodes

    if "downscale_ratio_spacial" not in inspect.signature(comfy.sample.fix_empty_latent_channels).parameters:
        pytest.skip("this ComfyUI does not resize empty latents by the format's ratio")
    empty = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    pixel, latent = load(env, "edm2-img64-tiny"), load(env, "edm2-img512-tiny")
    assert pixel.model.latent_format.spacial_downscale_ratio == 1
    assert latent.model.latent_format.spacial_downscale_ratio == 8
    fixed = comfy.sample.fix_empty_latent_channels(pixel, empty["samples"], empty.get("downscale_ratio_spacial"))
    assert tuple(fixed.shape) == (1, 3, 64, 64)
    fixed = comfy.sample.fix_empty_latent_channels(latent, empty["samples"], empty.get("downscale_ratio_spacial"))
    assert tuple(fixed.shape) == (1, 4, 8, 8)


def test_edm2_patcher_can_be_loaded_again_by_comfyui(env):
    """Newer ComfyUI reloads a model through its patcher's ``cached_patcher_init`` for the multi-GPU
    split (``deepclone_multigpu``) and for non-dynamic delegates: the EDM2 loader names itself, and the
    reload is a fresh network with the same weights and the same output."""
    p = load(env, "edm2-img512-tiny")
    fn, args = p.cached_patcher_init[:2]
    q = fn(*args, disable_dynamic=True)
    assert q.model is not p.model and q.model.diffusion_model is not p.model.diffusion_model
    x, s, y = torch.randn(1, 4, 16, 16), torch.tensor([1.0]), torch.eye(1000)[:1]
    with torch.inference_mode():
        assert torch.equal(p.model.apply_model(x, s, y=y), q.model.apply_model(x, s, y=y))
    if hasattr(p, "deepclone_multigpu"):   # v0.33+: ComfyUI's own deep clone, onto the same (CPU) device
        c = p.deepclone_multigpu(new_load_device=p.load_device)
        assert c.model is not p.model
        with torch.inference_mode():
            assert torch.equal(p.model.apply_model(x, s, y=y), c.model.apply_model(x, s, y=y))


def test_edm2_patcher_is_dynamic_where_comfyui_is(env, monkeypatch):
    """Issue 24 item 6: where DynamicVRAM is on, ComfyUI's start-up rebinds ``CoreModelPatcher`` to its
    dynamic patcher and its own loaders use that; so does the EDM2 loader (a plain patcher in a load
    switches ComfyUI's freeing policy for every dynamic model beside it). The non-dynamic delegate
    (``disable_dynamic``) is the plain patcher. Before: always the plain one."""
    import comfy.model_patcher

    class Dynamic(comfy.model_patcher.ModelPatcher):      # stands in for ModelPatcherDynamic on the CPU
        pass

    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", Dynamic, raising=False)
    p = load(env, "edm2-img512-tiny")
    assert type(p) is Dynamic
    fn, args = p.cached_patcher_init[:2]
    assert type(fn(*args, disable_dynamic=True)) is comfy.model_patcher.ModelPatcher
    assert type(fn(*args)) is Dynamic


def test_edm2_cast_layers_release_each_cast(env, monkeypatch):
    """Under DynamicVRAM a layer's weight is cast into a slice of VRAM that stays pinned until
    ``uncast_bias_weight`` releases it (ComfyUI's own layers call it after each use). Every cast MPConv
    forward asks for the releasable form and releases it (0.33+; 0.3.64 has only the two-value form)."""
    import comfy.ops

    p = load(env, "edm2-img512-tiny")
    net = p.model.diffusion_model
    layers = [m for m in net.modules() if type(m).__name__ == "CastMPConv"]   # the node's import of the pack
    assert layers
    x, s, y = torch.randn(1, 4, 16, 16), torch.tensor([1.0]), torch.eye(1000)[:1]
    with torch.inference_mode():
        want = p.model.apply_model(x, s, y=y)
    casts, releases = [], []
    real_cast = comfy.ops.cast_bias_weight

    def cast(*a, **k):
        casts.append(k.get("offloadable", False))
        return real_cast(*a, **k)

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", cast)
    if hasattr(comfy.ops, "uncast_bias_weight"):
        real_uncast = comfy.ops.uncast_bias_weight
        monkeypatch.setattr(comfy.ops, "uncast_bias_weight", lambda *a: releases.append(a[0]) or real_uncast(*a))
    for m in layers:
        monkeypatch.setattr(m, "comfy_cast_weights", True, raising=False)
    with torch.inference_mode():
        got = p.model.apply_model(x, s, y=y)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(casts) >= len(layers) // 2 > 0          # the forward went through the cast path
    if hasattr(comfy.ops, "uncast_bias_weight"):
        assert all(casts), "every cast must be the releasable (offloadable) form"
        assert len(releases) == len(casts) and set(map(id, releases)) <= set(map(id, layers))
    else:
        assert not any(casts)
