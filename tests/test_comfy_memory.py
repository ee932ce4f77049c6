"""What a small GPU does to the pack, simulated on the CPU (issue "On the GPUs people have", item 7):
partial loads of a classifier (the ``meta`` device stands in for the GPU: a partial load moves only
what fits), a loader output that ComfyUI drops, and the reference prompts of a KSampler with the
GFCG Model Patch, run twice. Each test failed before its fix (review3 r2, r1, r6)."""
import gc
import logging

import pytest
import torch

from conftest import node

pytestmark = pytest.mark.comfy
open_clip = pytest.importorskip("open_clip")

CLASSES = "cat\ndog\nfox"


@pytest.fixture(scope="module")
def clip_file(env, tmp_path_factory):
    import folder_paths

    from test_clip_classifier import ARCH, save_tiny

    folder = tmp_path_factory.mktemp("gfcg_clip_memory")
    path, _ = save_tiny(str(folder))
    folder_paths.add_model_folder_path("gfcg_clip", str(folder))
    return dict(name=path.split("/")[-1], arch=ARCH, path=path)


def zero_shot(env, clip_file, classes=CLASSES):
    with torch.inference_mode():      # as ComfyUI executes nodes
        return node(env, "GFCGLoadZeroShotClassifier", clip_name=clip_file["name"], architecture=clip_file["arch"],
                    class_source="list", class_list=classes, templates="a photo of a {}.")


def devices(module):
    return {str(t.device) for t in list(module.parameters()) + list(module.buffers())}


@pytest.mark.parametrize("kind", ["timm", "zero-shot"])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9])
def test_partially_loaded_classifier_runs_on_the_load_device(env, clip_file, kind, fraction):
    """review3 r2: ComfyUI loads a classifier partially (lowvram) when VRAM is short; the parts that do
    not fit stay on the offload device. Before: 'Expected all tensors to be on the same device'."""
    import copy

    import comfy.model_patcher

    clf = env["clf"] if kind == "timm" else zero_shot(env, clip_file)
    module = copy.deepcopy(clf.classifier)
    images = torch.rand(2, 3, 24, 24)
    want = module(images)
    p = comfy.model_patcher.ModelPatcher(module, load_device=torch.device("meta"), offload_device=torch.device("cpu"))
    p.partially_load(torch.device("meta"), extra_memory=p.model_size() * fraction)
    if fraction == 0.9:
        assert devices(module) == {"meta", "cpu"}, "the simulated partial load must split the classifier"
    out = module(images.to("meta"))                   # the forward runs on the load device
    assert out.device.type == "meta" and out.shape == want.shape
    if fraction == 0.9:
        assert devices(module) == {"meta", "cpu"}      # nothing was moved behind ComfyUI's back


def test_classifier_patcher_is_the_one_comfyui_loaders_use(env):
    """A plain (never dynamic) patcher in a load makes ComfyUI really unload the dynamic models beside
    it; the classifier's patcher is ComfyUI's CoreModelPatcher (dynamic where DynamicVRAM is on)."""
    import comfy.model_patcher

    want = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = env["clf"].patcher
    assert isinstance(patcher, want)
    if hasattr(patcher, "is_dynamic"):
        import comfy.model_management as mm

        # on the CPU ComfyUI hands out the plain patcher; on a DynamicVRAM GPU the dynamic one
        assert patcher.is_dynamic() == (want is not comfy.model_patcher.ModelPatcher
                                        and mm.get_torch_device().type == "cuda")
    copy_patcher = patcher.cached_patcher_init[0](*patcher.cached_patcher_init[1], disable_dynamic=True)
    assert type(copy_patcher) is comfy.model_patcher.ModelPatcher
    assert copy_patcher.model is not patcher.model


class _Logs(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_dropped_zero_shot_output_leaves_no_dead_model(env, clip_file):
    """review3 r1: the zero-shot loader cached whole classifiers, so a loader output ComfyUI dropped
    stayed alive: a dead LoadedModel never offloaded (VRAM held until restart) and a 'memory leak'
    warning with a full gc.collect() on every later model load."""
    import comfy.model_management as mm

    first = zero_shot(env, clip_file, "cat\ndog")
    mm.load_models_gpu([first.patcher])
    second = zero_shot(env, clip_file, "cat\ndog\nfox")
    mm.load_models_gpu([second.patcher])
    first_module = first.classifier
    ref = __import__("weakref").ref(first_module)
    del first, first_module                         # ComfyUI's output cache drops the old output
    gc.collect()
    assert ref() is None, "the dropped classifier is still alive (cached behind ComfyUI's back)"
    assert not [lm for lm in mm.current_loaded_models if lm.is_dead()]
    logs = _Logs()
    logging.getLogger().addHandler(logs)
    try:
        mm.load_models_gpu([second.patcher])
    finally:
        logging.getLogger().removeHandler(logs)
    assert not [m for m in logs.messages if "leak" in m.lower()], logs.messages


def _tiny_sd_clip():
    """A real ComfyUI CLIP (SD1 tokenizer and text model) with tiny random weights."""
    import comfy.sd1_clip

    from test_comfy_reference_conds import SMALL_CLIP, _tiny_clip

    return _tiny_clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, {"clip_l_model_config": SMALL_CLIP})


def test_reference_prompts_are_encoded_before_sampling_once_per_clip(env, monkeypatch):
    """review3 r6: reference prompts were encoded inside the sampling loop, so ComfyUI loaded the text
    encoder while the diffusion model sampled (load_models_gpu mid-run), again on every KSampler
    run with the Model Patch. Now: every prompt the run can need before the first step, once."""
    import comfy.model_management as mm
    import comfy.samplers
    import nodes as comfy_nodes

    cm = env["cm"]
    clip = _tiny_sd_clip()
    pos = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a shape 3")[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    model, _ = cm.tiny_model()
    state = {"sampling": False, "mid_run_loads": [], "encodes": 0}
    orig_load, orig_pn = mm.load_models_gpu, comfy.samplers.CFGGuider.outer_predict_noise
    orig_encode = type(clip).encode_from_tokens_scheduled

    def spy_load(models, *a, **k):
        if state["sampling"]:
            state["mid_run_loads"].append([type(x.model).__name__ for x in models])
        return orig_load(models, *a, **k)

    def spy_predict(self, *a, **k):
        state["sampling"] = True
        try:
            return orig_pn(self, *a, **k)
        finally:
            state["sampling"] = False

    def spy_encode(self, *a, **k):
        state["encodes"] += 1
        return orig_encode(self, *a, **k)

    monkeypatch.setattr(mm, "load_models_gpu", spy_load)
    monkeypatch.setattr(comfy.samplers.CFGGuider, "outer_predict_noise", spy_predict)
    monkeypatch.setattr(type(clip), "encode_from_tokens_scheduled", spy_encode)
    patched = node(env, "GFCGModelPatch", model=model, classifier=env["clf"], desired_class="shape 3", tau=1.0,
                   alpha=4.0, beta=1.0, window_start=0.0, window_end=1.0, period=1, reference="deterministic",
                   clip=clip, prompt_template="a photo of a {}")
    encodes = []
    for run in range(2):
        before = state["encodes"]
        with torch.inference_mode():
            comfy_nodes.KSampler().sample(patched, run, 3, 3.0, "euler", "karras", pos, neg,
                                          {"samples": torch.zeros(2, 3, 16, 16)}, denoise=1.0)
        encodes.append(state["encodes"] - before)
    classes = env["clf"].classifier.num_classes
    assert state["mid_run_loads"] == [], f"models loaded inside the sampling loop: {state['mid_run_loads']}"
    assert encodes == [classes - 1, 0], encodes       # every class but the desired one, then none again
    # the reference branch really ran with those encodings (tau 1: every sample is confused)
    guider = patched.get_wrappers("outer_sample", "comfyui_gfcg.model_patch")[0].last_guider
    assert guider.reference.encoded_in_loop == 0 and guider.reference._cache


@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_partially_loaded_edm2_network_runs_on_the_load_device(env, fraction):
    """An EDM2 net that ComfyUI loads partially (lowvram: an XXL on a small card) keeps its offloaded
    layers on the offload device; they cast their weights on the fly as ComfyUI's own layers do
    (``CastMPConv``), and the Fourier features follow the input. Before: a device mismatch."""
    import comfy.model_patcher

    from comfyui_gfcg.edm2.comfy_model import CastMPConv, model_from_checkpoint
    from comfyui_gfcg.testbed.perf_latent import _network_checkpoint

    model = model_from_checkpoint(_network_checkpoint("tiny", 1), "fp32").model
    net = model.diffusion_model
    assert any(isinstance(m, CastMPConv) for m in net.modules())
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([0.5, -0.3]), torch.eye(1000)[:2]
    with torch.no_grad():
        want = net(x, t, y=y)
    p = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("meta"), offload_device=torch.device("cpu"))
    p.partially_load(torch.device("meta"), extra_memory=p.model_size() * fraction)
    assert devices(net) == {"meta", "cpu"}, "the simulated partial load must split the network"
    with torch.no_grad():
        out = net(x.to("meta"), t.to("meta"), y=y.to("meta"))
    assert out.device.type == "meta" and out.shape == want.shape
    assert any(getattr(m, "comfy_cast_weights", False) for m in net.modules())   # ComfyUI turned the casts on


def test_edm2_cast_layers_give_the_plain_result(env):
    """With the casts on (what ComfyUI sets on an offloaded layer), the result is the plain forward's."""
    from comfyui_gfcg.edm2.comfy_model import CastMPConv, model_from_checkpoint
    from comfyui_gfcg.testbed.perf_latent import _network_checkpoint

    net = model_from_checkpoint(_network_checkpoint("tiny", 1), "fp32").model.diffusion_model
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([0.5, -0.3]), torch.eye(1000)[:2]
    with torch.no_grad():
        want = net(x, t, y=y)
        for m in net.modules():
            if isinstance(m, CastMPConv):
                m.comfy_cast_weights = True
        got = net(x, t, y=y)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _forced_free_memory(monkeypatch, free_bytes):
    """ComfyUI's free-memory estimate forced to ``free_bytes`` (model management's and, on 0.33+,
    the patcher's own view), as on a small GPU."""
    import comfy.model_management as mm
    import comfy.model_patcher

    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: free_bytes)
    if hasattr(comfy.model_patcher.ModelPatcher, "get_free_memory"):
        monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", lambda self, *a, **k: free_bytes)


def test_vae_decode_for_the_classifier_batches_by_comfyuis_estimate(env, monkeypatch):
    """The decode during sampling is batched by ComfyUI's own memory estimate at the classifier's
    size (as VAE.decode batches), not one call for the whole batch whatever memory is free."""
    from comfyui_gfcg.edm2.comfy_model import model_from_checkpoint
    from comfyui_gfcg.guiders.comfy_decode import PixelDecoder
    from comfyui_gfcg.testbed.perf_latent import _network_checkpoint

    model = model_from_checkpoint(_network_checkpoint("tiny", 1), "fp32").model    # SD-VAE latents
    vae = env["cm"].taesd_vae(seed=3)
    x0 = torch.randn(4, 4, 8, 8) * 0.5
    calls = []
    real = vae.first_stage_model.decode
    monkeypatch.setattr(vae.first_stage_model, "decode", lambda a: calls.append(int(a.shape[0])) or real(a))
    decoder = PixelDecoder(vae, "vae", 1.0)
    with torch.inference_mode():
        whole = decoder(model, x0)
        assert calls == [4]                           # plenty of memory (the CPU's): one call
        per_image = vae.memory_used_decode((1, 4, 8, 8), vae.vae_dtype)
        _forced_free_memory(monkeypatch, int(per_image * 1.5))
        calls.clear()
        small = decoder(model, x0)
    assert calls == [1, 1, 1, 1]                      # room for one image at a time
    torch.testing.assert_close(small, whole, rtol=1e-5, atol=1e-5)


def test_vae_decode_for_the_classifier_falls_back_to_tiles_on_out_of_memory(env):
    from comfyui_gfcg.guiders import comfy_decode

    vae = env["cm"].taesd_vae(seed=3)
    z = torch.randn(2, 4, 96, 96)                     # larger than one 64-pixel tile

    def decode(a):
        if a.shape[-1] > 64:                          # "out of memory" above the tile size
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return vae.first_stage_model.decode(a).float()

    comfy_decode._told.discard("tiled")
    logs = _Logs()
    logging.getLogger("comfyui_gfcg").addHandler(logs)
    try:
        with torch.inference_mode():
            img = comfy_decode.decode_batches(vae, z, decode)
    finally:
        logging.getLogger("comfyui_gfcg").removeHandler(logs)
    assert img.shape == (2, 3, 96 * 8, 96 * 8) and bool(torch.isfinite(img).all())
    assert any("decoding it in tiles" in m for m in logs.messages), logs.messages

    def broken(a):
        raise RuntimeError("a real bug, not memory")

    with torch.inference_mode(), pytest.raises(RuntimeError, match="a real bug"):
        comfy_decode.decode_batches(vae, z, broken)   # only out-of-memory falls back


def test_loaders_take_a_weight_dtype(env, clip_file):
    """weight_dtype on both loaders: the weights in that dtype (auto: ComfyUI's fp16 rule for its
    device, so fp32 on the CPU); the logits stay fp32."""
    import comfy.model_management as mm

    auto = torch.float16 if mm.should_use_fp16(mm.get_torch_device()) else torch.float32
    images = torch.rand(2, 3, 32, 32)
    for name, want in (("auto", auto), ("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        timm_clf = node(env, "GFCGLoadImageClassifier", classifier_name="tiny_resnet.safetensors", architecture="",
                        weight_dtype=name).classifier
        with torch.inference_mode():
            zs = node(env, "GFCGLoadZeroShotClassifier", clip_name=clip_file["name"], architecture=clip_file["arch"],
                      class_source="list", class_list=CLASSES, templates="a photo of a {}.",
                      weight_dtype=name).classifier
        for clf in (timm_clf, zs):
            assert {p.dtype for p in clf.net.parameters()} == {want}, (name, clf.name)
            assert clf(images).dtype == torch.float32
    schema = env["reg"]["GFCGLoadImageClassifier"].GET_SCHEMA()
    assert [i.id for i in schema.inputs][-1] == "weight_dtype"    # last: saved workflows keep their widget order


def test_gradient_guider_copies_are_counted_by_comfyui(env, monkeypatch):
    """Issue 24 item 3: the gradient guider's per-run copies (the classifier with Softplus, the VAE
    decoder) are device memory outside ComfyUI's models. ComfyUI is asked for room before they are
    made: with its free-memory estimate forced low, another loaded model gives way while this run's
    models stay loaded. Before: no request at all, the other model stayed."""
    import comfy.model_management as mm
    import comfy.model_patcher

    from conftest import sample
    from test_comfy_cg import cg

    cm = env["cm"]
    m, _ = cm.tiny_model()
    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(64, 64), load_device=mm.get_torch_device(),
                                             offload_device=torch.device("cpu"))
    mm.load_models_gpu([other])
    assert any(lm.model is other for lm in mm.current_loaded_models)
    calls, real = [], mm.free_memory

    def spy(memory_required, device, keep_loaded=[], **kw):
        calls.append((memory_required, torch.device(device), [lm.model for lm in keep_loaded]))
        return real(memory_required, device, keep_loaded=keep_loaded, **kw)

    monkeypatch.setattr(mm, "free_memory", spy)
    guider = cg(env, m, cm.label_cond(3))
    _forced_free_memory(monkeypatch, 0)
    out = sample(guider)
    assert torch.isfinite(out).all()
    clf = env["clf"].classifier
    need = sum(t.numel() * t.element_size() for t in list(clf.parameters()) + list(clf.buffers()))
    asked = [c for c in calls if c[0] >= need and c[1] == torch.device(env["clf"].patcher.load_device)]
    assert asked, f"ComfyUI was not asked for the copies' {need} bytes: {calls}"
    kept = asked[0][2]
    assert any(p.model is m.model for p in kept), "the run's diffusion model must stay loaded"
    assert any(p is env["clf"].patcher for p in kept), "the run's classifier must stay loaded"
    assert not any(lm.model is other for lm in mm.current_loaded_models), "the other model did not give way"
    assert any(lm.model is env["clf"].patcher for lm in mm.current_loaded_models)


def test_gradient_copies_go_to_the_load_device(env):
    """A classifier that ComfyUI loaded partially (parts on the offload device): the gradient copy
    holds all of its weights on the load device, so its forward stays on one device."""
    import comfy.model_patcher

    from comfyui_gfcg.guiders.gradient import softplus_copy

    with torch.inference_mode():     # a fresh load (one that ComfyUI loaded before carries its load state)
        module = env["reg"]["GFCGLoadImageClassifier"].execute("tiny_resnet.safetensors", "").result[0].classifier
    p = comfy.model_patcher.ModelPatcher(module, load_device=torch.device("meta"), offload_device=torch.device("cpu"))
    p.partially_load(torch.device("meta"), extra_memory=p.model_size() * 0.9)
    assert devices(module) == {"meta", "cpu"}
    grad_copy, _ = softplus_copy(module, 5.0, torch.device("meta"))
    assert devices(grad_copy) == {"meta"} and devices(module) == {"meta", "cpu"}
    assert grad_copy(torch.rand(2, 3, 24, 24, device="meta")).device.type == "meta"
