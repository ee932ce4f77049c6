"""GFCG on DiT families (issue "Text-to-image" item 5): small random-weight Flux.1, SD3 (MMDiT) and
Flux.2 networks written as .safetensors files in the published key layout, loaded through ComfyUI's
own UNETLoader node (so ComfyUI's model detection reads their shapes and picks the family), then
GFCG through SamplerCustomAdvanced with a tiny timm classifier, the reference prompts encoded by
ComfyUI's own text encoders for that family (tiny random weights through the ``*_model_config``
overrides, as tests/test_comfy_reference_conds.py), and the classifier fed by decode = latent_rgb and
decode = taesd (a random-weight TAESD of the family's latent channels under ComfyUI's preview file
name, in models/vae_approx).

What ComfyUI's detection accepts, per version (comfy/model_detection.py):
- Flux.1: v0.33.0 reads hidden_size, context_in_dim and the head count (hidden_size / 128) from the
  shapes, so a 2-head, 1 + 1-block net of 3.9 M parameters loads; v0.3.64 fixes hidden_size 3072,
  24 heads and context_in_dim 4096 whatever the file holds, so no small Flux loads there (skipped
  with that reason).
- SD3 / SD3.5 (MMDiT): every version reads depth from x_embedder (hidden = 64 * depth, heads =
  depth), the context and pooled widths from their layers: a depth-2 net (hidden 128) loads.
- Flux.2 (128-channel latents): v0.33.0 only (v0.3.64 has no Flux.2). Detection reads the widths as
  for Flux.1. Its text encoders (Mistral-3 24B, Qwen-3 4B/8B) have no small configuration in
  ComfyUI, so the Flux.2 net here takes the tiny Flux.1 text encoder's 16-wide context (its txt_in
  is made that wide): the network, latent format, TAESD and latent_rgb are Flux.2's, the text
  encoder is a stand-in.
"""
import dataclasses

import pytest
import torch

from conftest import node
from test_comfy_reference_conds import SMALL_CLIP, SMALL_T5, _tiny_clip

pytestmark = pytest.mark.comfy

DESIRED = "shape 3"          # the tiny classifier's class names: "shape i, si"
TEMPLATE = "a photo of a {}, oil painting"
PROMPT = TEMPLATE.format(DESIRED)
TAESD_NAMES = {"flux": "taef1_decoder", "sd3": "taesd3_decoder", "flux2": "taef2_decoder"}


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Every weight N(0, std^2), norm scales 1, biases 0 (ComfyUI builds its layers without init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and (name.endswith("weight") or name.endswith("scale")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _flux_net(image_model: str, **cfg):
    """ComfyUI's Flux transformer (v0.33.0's FluxParams fields; unknown ones dropped for older trees)."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux, FluxParams

    fields = {f.name for f in dataclasses.fields(FluxParams)}
    dropped = {k for k in cfg if k not in fields}
    assert not dropped - {"txt_ids_dims", "global_modulation", "mlp_silu_act", "ops_bias", "default_ref_method",
                          "ref_index_scale", "yak_mlp", "txt_norm"}, dropped
    return Flux(image_model=image_model, **{k: v for k, v in cfg.items() if k in fields},
                operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")


def flux1_state_dict(context: int, pooled: int) -> tuple:
    """(state dict in BFL's published layout, the architecture): Flux.1 dev (guidance embedding)
    with hidden 256 (2 heads of 128), 1 double and 1 single block."""
    cfg = dict(in_channels=16, out_channels=16, vec_in_dim=pooled, context_in_dim=context, hidden_size=256,
               mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
               patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
    net = _flux_net("flux", **cfg)
    _randomise(net, 0)
    # BFL's files name the q/k RMSNorm weights "scale" (ComfyUI renames them on load)
    sd = {(k[:-len("weight")] + "scale" if k.endswith(("query_norm.weight", "key_norm.weight")) else k): v
          for k, v in net.state_dict().items()}
    return sd, cfg


def flux2_state_dict(context: int) -> tuple:
    """Flux.2's transformer as ComfyUI's detection configures it (shared modulation, SiLU-gated MLP
    of ratio 3, no biases, four rope axes of 32) at hidden 256 (2 heads), 1 + 1 blocks, with a
    ``context``-wide txt_in."""
    cfg = dict(in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=context, hidden_size=256,
               mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[32, 32, 32, 32], theta=2000,
               patch_size=1, qkv_bias=False, guidance_embed=True, txt_ids_dims=[3], global_modulation=True,
               mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0)
    net = _flux_net("flux2", **cfg)
    _randomise(net, 1)
    return dict(net.state_dict()), cfg


def sd3_state_dict(pooled: int) -> tuple:
    """SD3's MMDiT at depth 2 (hidden 128, 2 heads of 64; ComfyUI ties the width to the depth), the
    4096-wide context of SD3's text encoders, a 32 x 32 position table."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    cfg = dict(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=pooled,
               context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
               pos_embed_max_size=32, num_patches=1024, pos_embed_scaling_factor=None, qk_norm=None,
               x_block_self_attn_layers=[])
    net = MMDiT(**cfg, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    _randomise(net, 2)
    return dict(net.state_dict()), cfg


@pytest.fixture(scope="module")
def dit(env, tmp_path_factory):
    """The tiny text encoders, the model files in a diffusion_models folder, TAESD decoders in a
    vae_approx folder, and a loader through ComfyUI's UNETLoader node."""
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    import folder_paths
    from safetensors.torch import save_file

    clips = {
        "flux": _tiny_clip(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip(),
                           {"clip_l_model_config": SMALL_CLIP, "t5xxl_model_config": SMALL_T5}),
        "sd3": _tiny_clip(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                          comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False),
                          {"clip_l_model_config": SMALL_CLIP, "clip_g_model_config": dict(SMALL_CLIP, hidden_size=24)}),
    }
    clips["flux2"] = clips["flux"]          # the stand-in (see the module's docstring)
    widths = {}
    for fam, clip in clips.items():
        (t, d), = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        widths[fam] = (int(t.shape[-1]), int(d["pooled_output"].shape[-1]))
    folder = tmp_path_factory.mktemp("diffusion_models")
    files, configs = {}, {}
    for fam, build in (("flux", lambda: flux1_state_dict(*widths["flux"])),
                       ("sd3", lambda: sd3_state_dict(widths["sd3"][1])),
                       ("flux2", lambda: flux2_state_dict(widths["flux2"][0]))):
        if fam == "flux2" and not _has_flux2():
            continue
        sd, configs[fam] = build()
        files[fam] = f"gfcg_tiny_{fam}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / files[fam]))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    approx = tmp_path_factory.mktemp("vae_approx")
    folder_paths.add_model_folder_path("vae_approx", str(approx))
    return dict(env=env, clips=clips, files=files, configs=configs, approx=approx)


def _has_flux2() -> bool:
    import comfy.latent_formats

    return hasattr(comfy.latent_formats, "Flux2")


def _comfy_version() -> str:
    from conftest import comfyui_version

    return "%d.%d.%d" % comfyui_version()


def load(dit, fam):
    """The family's file through ComfyUI's UNETLoader node (ComfyUI's detection), checked to be
    the family at the size written (where this ComfyUI's detection reads the sizes)."""
    import comfy.model_detection
    import comfy.utils
    import folder_paths

    if fam == "flux2" and not _has_flux2():
        pytest.skip(f"ComfyUI {_comfy_version()} has no Flux.2 (no Flux2 model, latent format or TAESD)")
    path = folder_paths.get_full_path_or_raise("diffusion_models", dit["files"][fam])
    detected = comfy.model_detection.model_config_from_unet(comfy.utils.load_torch_file(path), "")
    assert detected is not None, f"ComfyUI's detection does not recognise the {fam} file"
    want = dit["configs"][fam]
    key = "depth" if fam == "sd3" else "hidden_size"
    got = detected.unet_config.get(key)
    if got != want[key]:
        pytest.skip(f"ComfyUI {_comfy_version()}'s model detection fixes {fam}'s {key} at {got} (this file has "
                    f"{want[key]}), so no small random-weight stand-in loads there")
    for k in ("hidden_size", "num_heads", "depth", "depth_single_blocks", "context_in_dim", "vec_in_dim",
              "adm_in_channels", "in_channels", "patch_size"):
        if k in want and k in detected.unet_config:
            assert detected.unet_config[k] == want[k], (fam, k, detected.unet_config[k], want[k])
    nodes = dit["env"]["reg"]
    model = nodes["UNETLoader"]().load_unet(dit["files"][fam], "default")[0]
    expect = {"flux": "Flux", "sd3": "SD3", "flux2": "Flux2"}[fam]
    assert type(model.model).__name__ == expect, type(model.model).__name__
    return model


def taesd_state(channels: int, seed=0) -> dict:
    """ComfyUI's TAESD (encoder + decoder) with random weights and every 1-D weight 1: Flux.2's
    TAESD has GroupNorm layers, whose scales tests/comfy_models.random_taesd_state leaves as built
    (uninitialised memory; NaN pixels)."""
    import comfy_models as cm

    sd = cm.random_taesd_state(channels, seed)
    return {k: (torch.ones_like(v) if k.endswith("weight") and v.ndim == 1 else v) for k, v in sd.items()}


def taesd_vae(channels: int, seed=0):
    """A ComfyUI VAE of TAESD architecture with ``channels`` latent channels (random weights): the
    guider checks that its VAE fits the model (check_vae), decode = latent_rgb / taesd do not run it."""
    import comfy.sd

    sd = taesd_state(channels, seed)
    meta = {"tae_latent_channels": channels} if channels == 128 else None
    vae = comfy.sd.VAE(sd=sd, metadata=meta)
    assert vae.latent_channels == channels
    return vae


def write_taesd_decoder(folder, name: str, channels: int, seed=3):
    """A random-weight TAESD decoder file as ComfyUI's previewer finds it (``<name>.safetensors``)."""
    from safetensors.torch import save_file

    sd = taesd_state(channels, seed)
    dec = {k[len("taesd_decoder."):]: v for k, v in sd.items() if k.startswith("taesd_decoder.")}
    save_file(dec, str(folder / f"{name}.safetensors"))


def conditioning(dit, fam):
    env, clip = dit["env"], dit["clips"][fam]
    reg = env["reg"]

    def run(name, **kw):
        cls = reg[name]
        if hasattr(cls, "define_schema"):
            return cls.execute(**kw).result[0]
        return getattr(cls(), cls.FUNCTION)(**kw)[0]

    pos = run("CLIPTextEncode", clip=clip, text=PROMPT)
    neg = run("CLIPTextEncode", clip=clip, text="blurry")
    if fam in ("flux", "flux2"):
        pos = run("FluxGuidance", conditioning=pos, guidance=3.5)
        neg = None                           # guidance-distilled: GFCG alone, no CFG
    return pos, neg


def sample_flow(guider, channels, size=16, steps=3, batch=2, seed=1):
    """SamplerCustomAdvanced (euler, ComfyUI's "simple" schedule: the flow models' usual one)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "simple", steps)
    latent = {"samples": torch.zeros(batch, channels, size, size)}
    with torch.inference_mode():
        out, _ = SamplerCustomAdvanced().sample(Noise_RandomNoise(seed), guider, comfy.samplers.sampler_object("euler"),
                                                sigmas, latent)
    return out["samples"]


def gfcg(dit, fam, model, decode, tau=1.0):
    env = dit["env"]
    pos, neg = conditioning(dit, fam)
    channels = model.model.latent_format.latent_channels
    g = node(env, "GFCGGuider", model=model, positive=pos, classifier=env["clf"], desired_class=DESIRED, tau=tau,
             alpha=4.0, beta=1.0, window_start=0.0, window_end=1.0, period=1, reference="deterministic",
             vae=taesd_vae(channels), clip=dit["clips"][fam], prompt_template=TEMPLATE, decode=decode)
    if neg is not None:
        g = node(env, "GFCGCombiner", gfcg=g, combine_with="cfg", mode="additive", scale=4.0, negative=neg)
    return g


@pytest.mark.parametrize("fam", ["flux", "sd3", "flux2"])
@pytest.mark.parametrize("decode", ["latent_rgb", "taesd"])
def test_gfcg_samples_a_dit(dit, fam, decode):
    """The family's net through UNETLoader, GFCG (+ CFG for SD3) through SamplerCustomAdvanced: the
    classifier sees the decode's pixels at every step, confused samples get their reference
    prompt's branch (the sample differs from tau = 0, GFCG off), and every number is finite."""
    model = load(dit, fam)
    channels = model.model.latent_format.latent_channels
    assert channels == (128 if fam == "flux2" else 16)
    size = 8 if fam == "flux2" else 16          # Flux.2 latents are 1/16 of the image side
    if decode == "taesd":
        write_taesd_decoder(dit["approx"], TAESD_NAMES[fam], channels)
    g = gfcg(dit, fam, model, decode)
    out = sample_flow(g, channels, size=size)
    assert out.shape == (2, channels, size, size) and torch.isfinite(out).all()
    inner = g.engine if hasattr(g, "engine") else None
    assert inner is not None and len(inner.trace) == 3
    # tau = 1: every sample the classifier is not certain of is confused, so each step has a reference
    assert all(w > 1.0 for e in inner.trace for w in e.omega), "GFCG did not push every sample"
    assert all(0 <= r < 10 and r != 3 for e in inner.trace for r in e.reference), "a reference class is missing"
    off = sample_flow(gfcg(dit, fam, model, decode, tau=0.0), channels, size=size)
    assert not torch.equal(out, off), "GFCG changed nothing against tau = 0"


@pytest.mark.parametrize("fam", ["flux", "sd3", "flux2"])
def test_taesd_without_its_file_names_the_input_and_the_file(dit, fam):
    """decode = taesd without the family's TAESD decoder in models/vae_approx: an error naming the
    decode input, the file ComfyUI's previews use and where it goes."""
    from comfyui_gfcg.guiders.comfy_decode import PixelDecoder

    model = load(dit, fam)
    name = TAESD_NAMES[fam]
    for f in dit["approx"].glob(name + "*"):
        f.unlink()
    channels = model.model.latent_format.latent_channels
    dec = PixelDecoder(taesd_vae(channels), "taesd")
    with pytest.raises(Exception, match=rf"^decode: taesd needs {name}\.safetensors .*models/vae_approx"):
        dec(model.model, torch.zeros(1, channels, 8, 8))


@pytest.mark.parametrize("fam", ["flux", "sd3", "flux2"])
def test_latent_rgb_and_taesd_decode_the_latent_format(dit, fam):
    """At the decoder level: latent_rgb maps the format's latents to RGB in [0, 1] at the image's
    aspect (Flux.2: 128 channels un-patchified 2 x 2 into 32 at twice the side, as ComfyUI's
    preview), taesd gives [0, 1] pixels at 8 x the latent side (Flux.2: 16 x)."""
    from comfyui_gfcg.guiders.comfy_decode import PixelDecoder

    model = load(dit, fam)
    fmt = model.model.latent_format
    c = fmt.latent_channels
    x0 = torch.randn(2, c, 6, 4)
    rgb = PixelDecoder(taesd_vae(c), "latent_rgb")(model.model, x0)
    side = 2 if c == 128 else 1
    assert rgb.shape == (2, 3, 6 * side, 4 * side) and 0 <= rgb.min() and rgb.max() <= 1
    # the map is ComfyUI's preview map: v = W^T r(x0) + b, taken to [0, 1]
    r = fmt.latent_rgb_factors_reshape(x0) if getattr(fmt, "latent_rgb_factors_reshape", None) else x0
    w = torch.tensor(fmt.latent_rgb_factors)
    b = torch.tensor(getattr(fmt, "latent_rgb_factors_bias", None) or [0.0, 0.0, 0.0]).view(1, 3, 1, 1)
    want = ((torch.einsum("bchw,cr->brhw", r, w) + b + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(rgb, want, rtol=1e-5, atol=1e-6)
    write_taesd_decoder(dit["approx"], TAESD_NAMES[fam], c)
    pix = PixelDecoder(taesd_vae(c), "taesd")(model.model, x0)
    up = 16 if c == 128 else 8
    assert pix.shape == (2, 3, 6 * up, 4 * up) and 0 <= pix.min() and pix.max() <= 1


def test_nan_pixels_from_the_decode_are_reported(dit, caplog):
    """A decoder that gives NaN pixels (here a TAESD decoder file with a NaN weight, as a broken or
    half-written download would) must not pass silently as 'every sample confident': the run should
    stop with an error naming the decode input, or at least log a warning."""
    from safetensors.torch import load_file, save_file

    model = load(dit, "flux")
    write_taesd_decoder(dit["approx"], TAESD_NAMES["flux"], 16)
    path = dit["approx"] / f"{TAESD_NAMES['flux']}.safetensors"
    sd = load_file(str(path))
    first = sorted(k for k in sd if k.endswith("weight"))[0]
    sd[first] = torch.full_like(sd[first], float("nan"))
    save_file(sd, str(path))
    g = gfcg(dit, "flux", model, "taesd")
    try:
        with caplog.at_level("WARNING"):
            sample_flow(g, 16)
    except Exception as e:    # noqa: BLE001 -- an error is one acceptable answer, if it names the input
        assert "decode" in str(e), e
        return
    finally:
        write_taesd_decoder(dit["approx"], TAESD_NAMES["flux"], 16)
    assert all(p != p for e in g.engine.trace for p in e.p_des)     # NaN throughout: GFCG never acted
    assert any("decode" in r.getMessage() or "NaN" in r.getMessage() for r in caplog.records), \
        "NaN classifier input passed silently: GFCG switched itself off"


def test_latent_rgb_without_preview_colours_names_the_input(env):
    """A latent format ComfyUI gives no latent_rgb factors (its base LatentFormat; audio, 3-D and
    some video formats) must be refused with an error naming the decode input."""
    import comfy.latent_formats

    from comfyui_gfcg.guiders.comfy_decode import PixelDecoder

    fmt = comfy.latent_formats.LatentFormat()
    assert fmt.latent_rgb_factors is None

    class Model:
        latent_format = fmt

        @staticmethod
        def process_latent_out(x):
            return x

    with pytest.raises(Exception, match="^decode: "):
        PixelDecoder(taesd_vae(4), "latent_rgb")(Model(), torch.zeros(1, 4, 8, 8))
