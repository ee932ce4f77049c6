"""5-D latents (issue 25 item 5; review script r4_5d_latents.py): ComfyUI's Wan21 latent format (Qwen-Image,
Wan for images, Cosmos-Predict2, Anima) samples an image as ONE frame of a video-shaped latent
[B, 16, 1, H, W]. GFCG must decode that frame for the classifier, pick the full VAE for decode = auto
even where the format's preview file (lighttaew2_1, a TAEHV video TAE) is in models/vae_approx, refuse
decode = taesd on it, and refuse a real video latent (several frames) before the first step.

Everything is ComfyUI's own: the latent format (comfy.latent_formats.Wan21), the Wan 2.1 VAE
(comfy.sd.VAE detects it from the state dict's keys; small random weights), and a Qwen-Image model
(comfy.supported_models.QwenImage -> comfy.model_base.QwenImage -> QwenImageTransformer2DModel) with a
small transformer: ComfyUI's model detection reads only in_channels and the layer count of a Qwen-Image
file and fixes the width (24 heads of 128, a 3584-wide text context), so the model is built here from
its config, as ComfyUI builds it after detection, at 2 layers of 2 heads of 16 with a 16-wide text
context. Qwen-Image's text encoder (Qwen2.5-VL 7B, whose vision tower has a fixed 1280 width) has no
small configuration, so the text stand-in is ComfyUI's SD1.5 CLIP-L at a 16 width (the tiny encoder of
test_comfy_reference_conds.py): the network, latent format, sampling and VAE are Qwen-Image's.

The latents come as ComfyUI's Qwen-Image workflows make them: EmptySD3LatentImage gives a 4-D
[B, 16, h, w] and SamplerCustomAdvanced (comfy.sample.fix_empty_latent_channels) adds the frame axis
for a format with latent_dimensions == 3; a video latent (2 frames) comes from EmptyHunyuanLatentVideo,
the empty latent of ComfyUI's Wan workflows.

Per ComfyUI version: 0.3.64's VAE detection fixes the Wan 2.1 VAE's width at 96 (dim is read from
decoder.head.0.gamma only from later versions), so there the VAE is the full-width one (127 M random
parameters, a few seconds to build; decoded here at 4 x 4 and 8 x 8 latents only); 0.3.64's Wan21 has
no preview file name (taesd_decoder_name None), so the lighttaew2_1 file is simply unknown there.
"""
import math

import pytest
import torch

from conftest import node
from test_comfy_reference_conds import SMALL_CLIP, _tiny_clip
from test_comfy_dit import _randomise

pytestmark = pytest.mark.comfy

DESIRED = "shape 3"          # the tiny classifier's class names: "shape i, si"
TEMPLATE = "a photo of a {}, oil painting"
WAN_DIM = 8                  # the Wan 2.1 VAE's base width where ComfyUI reads it from the file
QWEN = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=SMALL_CLIP["hidden_size"],
            axes_dims_rope=(4, 6, 6))


# ------------------------------------------------------------------------------------------ builders
def _wan21_vae_state(dim: int, seed: int = 0) -> dict:
    """The state dict of ComfyUI's Wan 2.1 VAE (comfy.ldm.wan.vae.WanVAE as comfy.sd.VAE configures it:
    z_dim 16, dim_mult 1 2 4 4, two res blocks, temporal downsampling in the last two stages) at base
    width ``dim``, with finite random weights (ComfyUI builds its layers without init): conv weights
    N(0, 1 / fan_in), RMS-norm gammas 1, biases 0."""
    import comfy.ldm.wan.vae as wan_vae

    net = wan_vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                         temperal_downsample=[False, True, True], dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("gamma"):
            sd[k] = torch.ones(v.shape)
        elif k.endswith("bias"):
            sd[k] = torch.zeros(v.shape)
        else:
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(max(1, v[0].numel()))
    return sd


def wan21_vae():
    """A real comfy.sd.VAE of the Wan 2.1 architecture with random weights: WAN_DIM wide where this
    ComfyUI reads the width from decoder.head.0.gamma, else the width it fixes (96, 0.3.64)."""
    import comfy.sd

    try:
        vae = comfy.sd.VAE(sd=_wan21_vae_state(WAN_DIM))
    except RuntimeError as e:          # load_state_dict: size mismatch (the width is fixed here)
        assert "size mismatch" in str(e), e
        vae = comfy.sd.VAE(sd=_wan21_vae_state(96))
    assert type(vae.first_stage_model).__module__ == "comfy.ldm.wan.vae", type(vae.first_stage_model)
    assert vae.latent_channels == 16 and vae.latent_dim == 3
    return vae


def qwen_image_model(seed: int = 0):
    """ComfyUI's Qwen-Image model (supported_models.QwenImage -> model_base.QwenImage, the Wan21 latent
    format, its flow sampling with shift 1.15) with a small random-weight transformer, in a
    ModelPatcher; returns (patcher, the transformer)."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.QwenImage(dict(QWEN))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, device=torch.device("cpu"))
    assert type(model) is comfy.model_base.QwenImage
    assert type(model.latent_format) is comfy.latent_formats.Wan21 and model.latent_format.latent_dimensions == 3
    net = model.diffusion_model
    _randomise(net, seed)
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev), net


@pytest.fixture(scope="module")
def q(env, tmp_path_factory):
    """The Wan 2.1 VAE, the tiny text encoder, the Qwen-Image model and a vae_approx folder."""
    import comfy.sd1_clip
    import folder_paths

    clip = _tiny_clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, {"clip_l_model_config": SMALL_CLIP})
    model, net = qwen_image_model()
    approx = tmp_path_factory.mktemp("vae_approx_5d")
    folder_paths.add_model_folder_path("vae_approx", str(approx))
    return dict(env=env, vae=wan21_vae(), clip=clip, model=model, net=net, approx=approx)


def _decode_module():
    from comfyui_gfcg.guiders import comfy_decode

    return comfy_decode


def comfy_frame(vae, z):
    """ComfyUI's own VAE.decode of a 5-D latent (VAE space), frame 0 as [B, 3, H, W]: VAE.decode
    returns [B, T, H, W, C] for a 3-D VAE (channels last), [B, H, W, C] where a version drops T."""
    out = vae.decode(z)
    if out.ndim == 5:
        assert out.shape[1] == z.shape[2], out.shape
        out = out[:, 0]
    return out.movedim(-1, 1).float()


# ------------------------------------------------------------------------------ (a) the decoder
def test_wan21_frame_decodes_like_comfyuis_vae_decode(q):
    """decode = vae on a single-frame Wan21 latent [2, 16, 1, 8, 8]: finite RGB [2, 3, 64, 64] in [0, 1]
    at decode_resolution 1, equal to ComfyUI's own VAE.decode (process_latent_out first, frame 0)."""
    dec = _decode_module()
    model, vae = q["model"].model, q["vae"]
    clf = q["env"]["clf"].classifier
    x0 = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = dec.PixelDecoder(vae, "vae", 1.0, clf.resize_size)(model, x0)
        want = comfy_frame(vae, model.process_latent_out(x0))
    assert got.shape == (2, 3, 64, 64), got.shape
    assert torch.isfinite(got).all() and 0 <= got.min() and got.max() <= 1
    assert 0.05 < got.std() and not torch.equal(got[0], got[1]), "a degenerate decode proves nothing"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_wan21_frame_auto_resolution_shrinks_then_decodes(q):
    """decode_resolution 0 (auto, the node default): the frame is shrunk to what the classifier reads
    (auto_latent_size: 32 px for the tiny classifier, so a 8 x 8 latent to 4 x 4) and decoded as a
    frame: [2, 3, 32, 32] in [0, 1], equal to ComfyUI's VAE.decode of the shrunk frame. (Before the
    change: the crash at the first classifier step of the review.)"""
    from comfyui_gfcg.guiders.pixels import auto_latent_size

    dec = _decode_module()
    model, vae = q["model"].model, q["vae"]
    clf = q["env"]["clf"].classifier
    x0 = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    h, w = auto_latent_size(8, 8, 8, clf.resize_size)
    assert (h, w) == (4, 4)
    seen = []
    orig = vae.first_stage_model.decode
    vae.first_stage_model.decode = lambda z, *a, **k: (seen.append(tuple(z.shape)), orig(z, *a, **k))[1]
    try:
        with torch.inference_mode():
            got = dec.PixelDecoder(vae, "vae", 0.0, clf.resize_size)(model, x0)
    finally:
        del vae.first_stage_model.decode
    assert seen == [(2, 16, 1, h, w)], f"the VAE decoded {seen}, not one shrunk frame"
    assert got.shape == (2, 3, 8 * h, 8 * w), got.shape
    assert torch.isfinite(got).all() and 0 <= got.min() and got.max() <= 1
    small = torch.nn.functional.interpolate(x0[:, :, 0], size=(h, w), mode="bilinear", antialias=True,
                                            align_corners=False).unsqueeze(2)
    with torch.inference_mode():
        want = comfy_frame(vae, model.process_latent_out(small))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_wan21_frame_latent_rgb(q):
    """decode = latent_rgb on a single frame: Wan21's preview colours of frame 0, [2, 3, 6, 4] in [0, 1]
    (the latent's own pixels; auto resolution does not shrink them)."""
    dec = _decode_module()
    model = q["model"].model
    fmt = model.latent_format
    x0 = torch.randn(2, 16, 1, 6, 4, generator=torch.Generator().manual_seed(3))
    got = dec.PixelDecoder(q["vae"], "latent_rgb", 0.0, q["env"]["clf"].classifier.resize_size)(model, x0)
    assert got.shape == (2, 3, 6, 4), got.shape
    w = torch.tensor(fmt.latent_rgb_factors)
    b = torch.tensor(fmt.latent_rgb_factors_bias).view(1, 3, 1, 1)
    want = ((torch.einsum("bchw,cr->brhw", x0[:, :, 0], w) + b + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _write_video_tae(folder, name: str) -> None:
    """``name``.safetensors as ComfyUI's previewer finds Wan's: a TAEHV (video TAE) state dict where
    this ComfyUI has the class, a TAESD decoder's otherwise (resolve_decode reads only the name)."""
    from safetensors.torch import save_file

    try:
        import comfy.taesd.taehv as taehv

        sd = taehv.TAEHV(latent_channels=16).state_dict()
    except (ImportError, TypeError):
        import comfy_models as cm

        sd = cm.random_taesd_state(16)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / f"{name}.safetensors"))


def test_auto_decode_picks_the_vae_for_wan21_even_with_its_video_tae_present(q):
    """decode = auto with lighttaew2_1.safetensors (the Wan21 preview file: a video TAE) in
    models/vae_approx resolves to the full VAE, and the guider built with it decodes with the VAE; on
    a 2-D format with its TAESD file present, auto still takes taesd (unchanged)."""
    import comfy.latent_formats

    dec = _decode_module()
    env, model, vae = q["env"], q["model"], q["vae"]
    name = getattr(model.model.latent_format, "taesd_decoder_name", None) or "lighttaew2_1"
    _write_video_tae(q["approx"], name)
    assert dec.taesd_files(name), "the preview file is not found in models/vae_approx"
    assert dec.resolve_decode(model.model, vae, "auto") == "vae"
    g = node(env, "GFCGGuider", model=model, positive=_positive(q), classifier=env["clf"], desired_class=DESIRED,
             tau=1.0, alpha=4.0, beta=1.0, window_start=0.0, window_end=1.0, period=1, reference="deterministic",
             vae=vae, clip=q["clip"], prompt_template=TEMPLATE, decode="auto", decode_resolution=0.0)
    assert g.decoder.method == "vae"

    # a 2-D format (SD1.5 latents) with its TAESD decoder present: taesd, as before
    cm = env["cm"]
    sd_model, _ = cm.tiny_model(latent=True)
    assert getattr(comfy.latent_formats.SD15(), "latent_dimensions", 2) == 2
    from safetensors.torch import save_file

    sd = cm.random_taesd_state(4)
    path = q["approx"] / "taesd_decoder.safetensors"
    save_file({k[len("taesd_decoder."):]: v for k, v in sd.items() if k.startswith("taesd_decoder.")}, str(path))
    try:
        assert dec.resolve_decode(sd_model.model, cm.taesd_vae(), "auto") == "taesd"
    finally:
        path.unlink()        # the folder stays registered for the session: leave other tests' auto alone


def test_taesd_on_wan21_is_refused_naming_decode(q):
    """decode = taesd on Wan21 latents: ComfyUI has no TAESD for them (its previewer uses a video TAE),
    so it is refused up front, naming the decode input, by resolve_decode and by both guider nodes."""
    dec = _decode_module()
    env, model, vae = q["env"], q["model"], q["vae"]
    with pytest.raises(Exception, match=r"^decode: taesd cannot decode Wan21 latents") as e:
        dec.resolve_decode(model.model, vae, "taesd")
    assert type(e.value).__name__ == "GFCGInputError"
    with pytest.raises(Exception, match=r"decode: taesd cannot decode Wan21 latents"):
        node(env, "GFCGGuider", model=model, positive=_positive(q), classifier=env["clf"], desired_class=DESIRED,
             tau=1.0, alpha=4.0, beta=1.0, window_start=0.0, window_end=1.0, period=1, reference="deterministic",
             vae=vae, clip=q["clip"], prompt_template=TEMPLATE, decode="taesd", decode_resolution=0.0)
    with pytest.raises(Exception, match=r"decode: taesd cannot decode Wan21 latents"):
        _cg(q, decode="taesd")


# -------------------------------------------------------------------------- (b) end to end
def _positive(q, text=None):
    clip = q["clip"]
    return clip.encode_from_tokens_scheduled(clip.tokenize(text or TEMPLATE.format(DESIRED)))


def _gfcg(q, tau=1.0, decode="vae"):
    env = q["env"]
    return node(env, "GFCGGuider", model=q["model"], positive=_positive(q), classifier=env["clf"],
                desired_class=DESIRED, tau=tau, alpha=4.0, beta=1.0, window_start=0.0, window_end=1.0, period=1,
                reference="deterministic", vae=q["vae"], clip=q["clip"], prompt_template=TEMPLATE, decode=decode,
                decode_resolution=0.0)


def _cg(q, decode="vae", scale=0.05):
    env = q["env"]
    return node(env, "GFCGClassifierGuidance", model=q["model"], positive=_positive(q), classifier=env["clf"],
                desired_class=DESIRED, scale=scale, gamma=0.3, softplus_beta=5.0, tau1=1.0, tau2=0.0,
                classifier_input="denoised", cfg=1.0, vae=q["vae"], decode=decode, decode_resolution=0.0)


def empty_qwen_latent(batch=2, size=64):
    """ComfyUI's Qwen-Image empty latent: EmptySD3LatentImage (4-D, 16 channels, 1/8 of the side)."""
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    lat = EmptySD3LatentImage.execute(width=size, height=size, batch_size=batch)
    lat = lat.result[0] if hasattr(lat, "result") else lat[0]
    assert tuple(lat["samples"].shape) == (batch, 16, size // 8, size // 8)
    return lat


def empty_video_latent(batch=2, size=64, length=5):
    """ComfyUI's Wan video empty latent (EmptyHunyuanLatentVideo): length 5 -> 2 latent frames."""
    from comfy_extras.nodes_hunyuan import EmptyHunyuanLatentVideo

    cls = EmptyHunyuanLatentVideo
    if hasattr(cls, "define_schema"):
        lat = cls.execute(width=size, height=size, length=length, batch_size=batch).result[0]
    else:
        lat = getattr(cls(), cls.FUNCTION)(width=size, height=size, length=length, batch_size=batch)[0]
    assert lat["samples"].ndim == 5 and lat["samples"].shape[2] == 2, lat["samples"].shape
    return lat


def run_flow(guider, latent, steps=3, seed=1):
    """SamplerCustomAdvanced (euler, the "simple" schedule, under inference mode as ComfyUI runs)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "simple", steps)
    with torch.inference_mode():
        out, _ = SamplerCustomAdvanced().sample(Noise_RandomNoise(seed), guider, comfy.samplers.sampler_object("euler"),
                                                sigmas, latent)
    return out["samples"]


class _Spy:
    """Records the inputs of the classifier's forward, the VAE decoder's and the transformer's."""

    def __init__(self, q):
        self.clf = q["env"]["clf"].classifier
        self.first = q["vae"].first_stage_model
        self.net = q["net"]
        self.classified, self.decoded, self.forwards = [], [], []

    def __enter__(self):
        fc, fd, fn = self.clf.forward, self.first.decode, self.net.forward
        self.clf.forward = lambda x: (self.classified.append(tuple(x.shape)), fc(x))[1]
        self.first.decode = lambda z, *a, **k: (self.decoded.append(tuple(z.shape)), fd(z, *a, **k))[1]
        self.net.forward = lambda x, *a, **k: (self.forwards.append(tuple(x.shape)), fn(x, *a, **k))[1]
        return self

    def __exit__(self, *exc):
        del self.clf.forward, self.first.decode, self.net.forward


def test_qwen_image_gfcg_end_to_end_on_a_single_frame_latent(q):
    """The tiny Qwen-Image model, GFCG (tau 1, a text reference through the stand-in CLIP, decode = vae
    with the Wan 2.1 VAE, decode_resolution auto) through SamplerCustomAdvanced on ComfyUI's Qwen-Image
    empty latent: it runs, the model sampled [B, 16, 1, h, w], the VAE decoded the shrunk single frame,
    the classifier saw [B, 3, H, W] pixels at every step, every sample was confused and got its
    reference branch, and the result differs from tau = 0 (GFCG off)."""
    steps = 3
    g = _gfcg(q)
    assert g.decoder.method == "vae" and g.decoder.resolution == 0.0
    with _Spy(q) as spy:
        out = run_flow(g, empty_qwen_latent(), steps=steps)
    assert out.shape == (2, 16, 1, 8, 8) and torch.isfinite(out).all(), out.shape
    assert spy.forwards and all(s[:3] == (s[0], 16, 1) and s[3:] == (8, 8) for s in spy.forwards), spy.forwards
    # the classifier judged pixels [B, 3, H, W] at every step (period 1, the whole window)
    assert len(spy.classified) == steps, spy.classified
    assert all(len(s) == 4 and s[0] == 2 and s[1] == 3 for s in spy.classified), spy.classified
    # decode_resolution auto: the 8 x 8 frame shrunk to 4 x 4 (the 32 px the classifier reads), one frame
    assert spy.decoded and set(spy.decoded) == {(2, 16, 1, 4, 4)}, spy.decoded
    trace = g.engine.trace
    assert len(trace) == steps
    assert all(w > 1.0 for e in trace for w in e.omega), "GFCG did not push every sample"
    assert all(0 <= r < 10 and r != 3 for e in trace for r in e.reference), "a reference class is missing"
    # the reference branch ran: per step the batch's 2 positive rows and the 2 confused rows' reference
    assert sum(s[0] for s in spy.forwards) == steps * (2 + 2), spy.forwards
    with _Spy(q) as plain:
        off = run_flow(_gfcg(q, tau=0.0), empty_qwen_latent(), steps=steps)
    assert sum(s[0] for s in plain.forwards) == steps * 2, plain.forwards      # tau 0: no reference rows
    assert torch.isfinite(off).all() and not torch.equal(out, off), "GFCG changed nothing against tau = 0"


def test_qwen_image_gradient_guidance_on_a_single_frame_latent(q):
    """The gradient classifier guidance node on the same model and latent (gradients through the Wan
    VAE's decoder on the single frame, decode_resolution auto): it runs, every number finite, the
    classifier saw [B, 3, H, W] at every step, and the gradient moved the samples (against scale 0)."""
    steps = 2
    g = _cg(q)
    with _Spy(q) as spy:
        out = run_flow(g, empty_qwen_latent(), steps=steps)
    assert out.shape == (2, 16, 1, 8, 8) and torch.isfinite(out).all()
    assert len(spy.classified) == steps and all(s == (2, 3, 32, 32) for s in spy.classified), spy.classified
    assert len(g.engine.trace) == steps and all(0.0 <= p <= 1.0 for t in g.engine.trace for p in t.p_des)
    plain = run_flow(_cg(q, scale=0.0), empty_qwen_latent(), steps=steps)
    assert (out - plain).abs().max() > 1e-6, "the classifier's gradient did not reach the samples"


@pytest.mark.parametrize("guider", ["gfcg", "cg"])
def test_video_latent_is_refused_before_the_first_step(q, guider):
    """A 2-frame latent (ComfyUI's Wan video empty latent) is a video: refused before the model or the
    classifier runs, with an error naming the latent and its frame count."""
    g = _gfcg(q) if guider == "gfcg" else _cg(q)
    with _Spy(q) as spy:
        with pytest.raises(Exception, match=r"^latent: a video latent of 2 frames") as e:
            run_flow(g, empty_video_latent(), steps=2)
    assert type(e.value).__name__ == "GFCGInputError", type(e.value)
    assert spy.forwards == [] and spy.classified == [] and spy.decoded == [], "it ran before refusing"


def test_wan21_frame_falls_back_to_tiles_on_out_of_memory(env):
    """A single-frame decode that runs out of memory is tiled on the frame (the video VAE still gets
    [B, C, 1, h, w] tiles), as image latents are."""
    from comfyui_gfcg.guiders import comfy_decode

    vae = wan21_vae()
    z = torch.randn(1, 16, 1, 12, 12) * 0.5

    def decode(a):
        assert a.ndim == 5 and a.shape[2] == 1
        if a.shape[-1] > 8:                           # "out of memory" above an 8-latent-pixel tile
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return vae.first_stage_model.decode(a.to(vae.vae_dtype)).float()

    import comfy.utils

    seen = []
    orig = comfy.utils.tiled_scale

    def small_tiles(samples, function, **kw):
        seen.append(tuple(samples.shape))
        return orig(samples, function, **dict(kw, tile_x=8, tile_y=8, overlap=2))

    comfy.utils.tiled_scale = small_tiles
    try:
        with torch.inference_mode():
            img = comfy_decode.decode_batches(vae, z, decode)
    finally:
        comfy.utils.tiled_scale = orig
    assert seen == [(1, 16, 12, 12)]                  # the frame, tiled in 2-D
    assert img.shape == (1, 3, 1, 96, 96) and bool(torch.isfinite(img).all())
