"""EDM2 network and checkpoint reading, without ComfyUI: synthesised NVlabs pickles of small
random-weight networks of each family, read safely and through the safetensors round trip, checked
against an independent test-side computation of the formulas; full-size preset shapes."""
import math
import os

import pytest
import torch

import edm2_helpers as H
from comfyui_gfcg.edm2 import (EDM2, EDM2Config, build_network, count_parameters, preset_config, read_checkpoint,
                               read_nvlabs_pickle)
from comfyui_gfcg.edm2.__main__ import main as edm2_cli
from comfyui_gfcg.edm2.checkpoint import infer_config
from comfyui_gfcg.edm2.latents import (default_scale_bias, edm2_to_raw, preview_factors, raw_to_edm2)
from comfyui_gfcg.edm2.network import Block

FAMILIES = [("img512", 1000), ("img512", 0), ("img64", 1000), ("img64", 0)]


def labels_for(n, k=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, k)
    y[torch.arange(n), torch.randint(0, k, (n,), generator=g)] = 1
    return y


@pytest.fixture(params=FAMILIES, ids=[f"{f}-{'cond' if k else 'uncond'}" for f, k in FAMILIES])
def pkl(request, tmp_path):
    family, label_dim = request.param
    cfg = H.small_cfg(family, label_dim)
    sd = H.random_state_dict(cfg, seed=hash(request.param) % 1000)
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / f"edm2-{family}-tiny.pkl"
    path.write_bytes(H.nvlabs_pickle_bytes(cfg, sd, sentinel, "stability" if family == "img512" else "rgb"))
    return dict(cfg=cfg, sd=sd, path=path, sentinel=sentinel, family=family, tmp=tmp_path)


def test_pickle_reads_and_matches_reference_formulas(pkl):
    ckpt = read_nvlabs_pickle(str(pkl["path"]))
    assert not pkl["sentinel"].exists(), "module_src was executed"
    cfg = pkl["cfg"]
    assert set(ckpt.state_dict) == set(pkl["sd"])
    assert all(torch.equal(ckpt.state_dict[k], pkl["sd"][k]) for k in pkl["sd"])
    assert ckpt.config.model_channels == 32 and ckpt.config.channels_per_head == 32
    assert ckpt.config.label_dim == cfg["label_dim"] and ckpt.config.img_channels == cfg["img_channels"]
    assert ckpt.family == pkl["family"]
    if pkl["family"] == "img512":
        assert ckpt.encoder["kind"] == "stability_vae"
        assert ckpt.encoder["scale"] == pytest.approx([0.119904, 0.108225, 0.134771, 0.152439], abs=1e-6)
        assert ckpt.encoder["bias"] == pytest.approx([-0.696643, -0.351732, -0.016173, 0.327744], abs=1e-6)
    else:
        assert ckpt.encoder == {"kind": "standard_rgb"}

    net = build_network(ckpt, torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg["img_channels"], 16, 16, generator=g)
    y = labels_for(3) if cfg["label_dim"] else None
    for sigma in (0.002, 0.3, 2.0, 80.0):
        xs = x * sigma
        want = H.reference_denoiser(pkl["sd"], cfg, xs, sigma, y)
        got = net(xs, sigma, y)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, sigma))
    # per-sample sigmas in one batch, as the sampler sends them
    sig = torch.tensor([0.05, 1.0, 20.0])
    xs = x * sig.view(-1, 1, 1, 1)
    torch.testing.assert_close(net(xs, sig, y), H.reference_denoiser(pkl["sd"], cfg, xs, sig, y), rtol=1e-5, atol=2e-4)

    # safetensors round trip through the converter CLI: same config, same weights, same outputs
    out = pkl["tmp"] / "converted.safetensors"
    assert edm2_cli(["convert", str(pkl["path"]), str(out)]) == 0
    ck2 = read_checkpoint(str(out))
    assert ck2.config == ckpt.config and ck2.encoder == ckpt.encoder
    assert all(torch.equal(ck2.state_dict[k], ckpt.state_dict[k]) for k in ckpt.state_dict)
    assert torch.equal(build_network(ck2)(xs, sig, y), net(xs, sig, y))
    assert not pkl["sentinel"].exists()


def test_block_matches_formula():
    torch.manual_seed(0)
    cases = [dict(cin=32, cout=64, flavor="enc", mode="keep", heads=2),   # skip + pixel norm + attention
             dict(cin=64, cout=64, flavor="enc", mode="down", heads=0),
             dict(cin=96, cout=32, flavor="dec", mode="keep", heads=1),   # skip after the residual branch
             dict(cin=64, cout=64, flavor="dec", mode="up", heads=0)]
    for info in cases:
        blk = Block(info["cin"], info["cout"], 48, info["flavor"], info["mode"], attention=info["heads"] > 0,
                    channels_per_head=info["cout"] // max(info["heads"], 1))
        sd = {}
        for k, v in blk.state_dict().items():
            v.copy_(torch.randn(v.shape) * 0.7 + (0.8 if k == "emb_gain" else 0))
            sd["b." + k] = v.clone()
        x = torch.randn(2, info["cin"], 8, 8)
        emb = torch.randn(2, 48)
        want = H.ref_block(sd, "b.", info, x, emb)
        torch.testing.assert_close(blk(x, emb), want, rtol=1e-5, atol=1e-5)
        for m in blk.modules():  # folded weights give the same block
            if hasattr(m, "fold") and not m.folded:
                m.fold(blk.emb_gain if m is blk.emb_linear else 1.0)
        torch.testing.assert_close(blk(x, emb), want, rtol=1e-5, atol=1e-5)


def test_precond_is_the_documented_formula():
    """D = c_skip x + c_out F(c_in x, ln(sigma)/4), checked with F a plain callable."""
    net = EDM2(EDM2Config(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=(1,),
                          num_blocks=1, attn_resolutions=()))
    seen = {}

    def fake_raw(x_in, c_noise, labels=None):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return torch.full_like(x_in, 0.25)

    net.raw = fake_raw
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.5, 3.0])
    d = net(x, sigma)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_in"], x / torch.sqrt(s ** 2 + 0.25))
    torch.testing.assert_close(seen["c_noise"], torch.log(sigma) / 4)
    torch.testing.assert_close(d, 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / torch.sqrt(s ** 2 + 0.25) * 0.25)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_trunk_keeps_fp32_embeddings(tmp_path, dtype, tol):
    cfg = H.small_cfg("img512")
    sd = H.random_state_dict(cfg, seed=3)
    p = tmp_path / "m.pkl"
    p.write_bytes(H.nvlabs_pickle_bytes(cfg, sd, tmp_path / "S"))
    ck = read_nvlabs_pickle(str(p))
    ref, half = build_network(ck, torch.float32), build_network(read_nvlabs_pickle(str(p)), dtype)
    emb_ids = {id(q) for m in half.embedding_modules() for q in m.parameters(recurse=False)}
    for name, q in half.named_parameters():
        if q.ndim >= 2:
            assert q.dtype == (torch.float32 if id(q) in emb_ids else dtype), name
    assert half.unet.emb_fourier.freqs.dtype == torch.float32
    x, y = torch.randn(2, 4, 16, 16), labels_for(2)
    a, b = ref(x, 1.0, y), half(x, 1.0, y)
    assert b.dtype == torch.float32
    assert ((a - b).norm() / a.norm()).item() < tol


def test_infer_config_from_plain_state_dict():
    cfg = H.small_cfg("img64", 1000)
    got = infer_config(H.random_state_dict(cfg))
    for k in ("img_resolution", "img_channels", "label_dim", "model_channels", "num_blocks"):
        assert getattr(got, k) == cfg[k], k
    assert list(got.channel_mult) == cfg["channel_mult"] and list(got.attn_resolutions) == cfg["attn_resolutions"]


# ------------------------------------------------------------------ full-size presets
# Parameter counts (millions) and tensor counts from the pack's EDM2 reference note.
NOTE_PARAMS_M = {"xs": 124.7, "s": 280.2, "m": 497.8, "l": 777.5, "xl": 1119.3, "xxl": 1523.2}


@pytest.mark.parametrize("size", list(NOTE_PARAMS_M))
def test_preset_parameter_counts(size):
    cfg = preset_config("img512", size)
    assert round(count_parameters(cfg) / 1e6, 1) == NOTE_PARAMS_M[size]
    with torch.device("meta"):
        sd = EDM2(cfg).state_dict()
        sd_u = EDM2(preset_config("img512", size, conditional=False)).state_dict()
    assert len(sd) == 203 and len(sd_u) == 202 and set(sd) - set(sd_u) == {"unet.emb_label.weight"}
    C = cfg.model_channels
    shapes = {"unet.enc.64x64_conv.weight": (C, 5, 3, 3), "unet.dec.8x8_block3.conv_skip.weight": (4 * C, 7 * C, 1, 1),
              "unet.enc.16x16_block0.attn_qkv.weight": (9 * C, 3 * C, 1, 1), "unet.emb_label.weight": (4 * C, 1000),
              "unet.dec.64x64_block0.conv_res0.weight": (C, 3 * C, 3, 3), "unet.out_conv.weight": (4, C, 3, 3),
              "unet.emb_fourier.freqs": (C,), "unet.out_gain": (), "logvar_fourier.phases": (128,),
              "unet.dec.8x8_in0.attn_qkv.weight": (12 * C, 4 * C, 1, 1), "unet.enc.8x8_down.emb_gain": ()}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert "unet.enc.8x8_down.attn_qkv.weight" not in sd and "unet.dec.8x8_in1.attn_qkv.weight" not in sd
    attn = {k.rsplit(".", 2)[0] for k in sd if k.endswith("attn_qkv.weight")}
    assert len(attn) == 15  # attention in 15 blocks (note §1.3)


def test_img64_preset_shapes():
    with torch.device("meta"):
        sd = EDM2(preset_config("img64", "s")).state_dict()
    assert tuple(sd["unet.enc.64x64_conv.weight"].shape) == (192, 4, 3, 3)
    assert tuple(sd["unet.out_conv.weight"].shape) == (3, 192, 3, 3)


def test_cli_params_and_info(tmp_path, capsys):
    assert edm2_cli(["params"]) == 0
    out = capsys.readouterr().out
    assert "img512-xxl" in out and "1523.2 M" in out
    cfg = H.small_cfg("img512")
    p = tmp_path / "edm2-x.pkl"
    p.write_bytes(H.nvlabs_pickle_bytes(cfg, H.random_state_dict(cfg), tmp_path / "S"))
    assert edm2_cli(["info", str(p)]) == 0
    assert "family img512, model_channels 32, label_dim 1000 (conditional)" in capsys.readouterr().out


# ------------------------------------------------------------------ latent conventions
def test_latent_constants_and_conversions():
    scale, bias = default_scale_bias()
    assert scale == pytest.approx([0.119904, 0.108225, 0.134771, 0.152439], abs=1e-6)
    # x_edm = a x_sd + b with x_sd = 0.18215 z (note §3.3)
    a = [0.5 / (0.18215 * s) for s in (4.17, 4.62, 3.71, 3.28)]
    assert a == pytest.approx([0.658271, 0.594154, 0.739890, 0.836887], abs=1e-6)
    z = torch.randn(2, 4, 8, 8) * 4
    x = raw_to_edm2(z, scale, bias)
    torch.testing.assert_close(edm2_to_raw(x, scale, bias), z, rtol=1e-5, atol=1e-5)
    raw_mean = torch.tensor([5.81, 3.25, 0.12, -2.15]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    assert raw_to_edm2(raw_mean, scale, bias).abs().max() < 1e-6
    f, b = preview_factors(scale, bias)
    assert f[0] == pytest.approx([1.067, 0.698, 0.980], abs=2e-3)
    assert f[3] == pytest.approx([-0.507, -0.625, -1.715], abs=2e-3)
    assert b == pytest.approx([0.282, 0.288, 0.535], abs=2e-3)
    assert math.isclose(sum(map(abs, f[1])), 1.094 + 1.674 + 0.791, abs_tol=5e-3)


def test_edm2_imports_without_comfy():
    import subprocess
    import sys

    code = ("import sys, comfyui_gfcg.edm2 as e, comfyui_gfcg.edm2.__main__;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('comfy','folder_paths','comfy_api','nodes')];"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stderr
