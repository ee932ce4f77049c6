"""The shipped SD1.5 workflow samples end to end over ComfyUI's HTTP API: a full-size SD1.5
checkpoint with random weights (the 860 M-parameter UNet, the CLIP-L text encoder, the VAE; fp16
on disk, 2.1 GB) is written under the user's file name, loaded by CheckpointLoaderSimple (ComfyUI
recognises SD1.5 by its layer shapes, so nothing smaller would do), and ``sd15_gfcg_cfg`` runs at
64 x 64 pixels for 2 steps; the image and the trace plot come back through ``/view``.

Cost on 2 CPU cores (measured): writing the files 25 s, the run 18 s (load, text encoding of the
prompts and the reference prompts, 2 dpmpp_2m steps with CFG and GFCG, decode, trace plot); about
a minute with the server's start.
The random weights are drawn with a small standard deviation so that no activation overflows
fp16 and every number stays finite; the pictures mean nothing, the plumbing is the point."""
import time

import pytest
import torch

from conftest import api_post, api_wait, load_comfy, one_reference_on_cpu, small_text_prompt, view_image

pytestmark = pytest.mark.comfy

# ComfyUI's SD1.5 UNet configuration (comfy/model_detection.py, the "SD15" entry): the published
# architecture of runwayml/stable-diffusion-v1-5
SD15_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
             "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
             "use_temporal_resblock": False}


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Every parameter N(0, std^2) (norm weights 1): ComfyUI builds its modules without initialising them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.ndim == 1:      # norm scales
                p.fill_(1.0)
            elif name.endswith("bias") and p.ndim == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def write_sd15_checkpoint(path) -> int:
    """A full-size SD1.5 checkpoint in the original (LDM) layout with random weights; returns its
    parameter count."""
    from safetensors.torch import save_file

    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    sd, n = {}, 0
    parts = [("model.diffusion_model.", lambda: UNetModel(**SD15_UNET, dtype=torch.float32,
                                                          operations=comfy.ops.disable_weight_init)),
             ("cond_stage_model.", lambda: comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)),
             ("first_stage_model.", lambda: AutoencoderKL(embed_dim=4, ddconfig={
                 "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}))]
    for seed, (prefix, build) in enumerate(parts):
        m = build()
        _randomise(m, seed)
        for k, v in m.state_dict().items():
            if k.endswith("position_ids"):
                sd[prefix + k] = v.contiguous()
                continue
            sd[prefix + k] = v.to(torch.float16).contiguous()
            n += v.numel()
        del m
    save_file(sd, str(path))
    return n


@pytest.fixture(scope="module")
def sd15_files(server):
    import timm
    from safetensors.torch import save_file

    url, _, base = server
    models = base / "models"
    load_comfy()
    t0 = time.time()
    ckpt = models / "checkpoints" / "v1-5-pruned-emaonly.safetensors"
    if not ckpt.exists():
        n = write_sd15_checkpoint(ckpt)
        assert n > 1.0e9, n                                   # UNet 860 M + CLIP-L 123 M + VAE 84 M
    clf = models / "gfcg_classifiers" / "resnet50.a1_in1k.safetensors"
    if not clf.exists():
        torch.manual_seed(0)
        net = timm.create_model("resnet50", pretrained=False, num_classes=1000)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(clf))
    vae = models / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors"
    if not vae.exists():
        from comfyui_gfcg.testbed.decode_bench import sd_vae

        v, _ = sd_vae(None)
        save_file({k: x.contiguous() for k, x in v.first_stage_model.state_dict().items()}, str(vae))
    print(f"SD1.5 stand-in files written in {time.time() - t0:.0f} s ({ckpt.stat().st_size / 1e9:.2f} GB)")
    return server


def test_sd15_workflow_runs_over_http(sd15_files):
    url, _, base = sd15_files
    prompt = one_reference_on_cpu(small_text_prompt("sd15_gfcg_cfg", size=64, steps=2), "tabby cat")
    kinds = {v["class_type"] for v in prompt.values()}
    assert {"CheckpointLoaderSimple", "GFCGGuider", "GFCGCombiner", "SamplerCustomAdvanced"} <= kinds
    t0 = time.time()
    h = api_wait(url, api_post(url, "/prompt", {"prompt": prompt})["prompt_id"], timeout=900)
    seconds = time.time() - t0
    assert h["status"]["status_str"] == "success", h["status"]
    saved = next(o["images"] for k, o in h["outputs"].items() if prompt[k]["class_type"] == "SaveImage")
    img = view_image(url, saved[0])
    assert img.size == (64, 64)
    trace = next(o["images"] for k, o in h["outputs"].items() if prompt[k]["class_type"] == "PreviewImage")
    assert view_image(url, trace[0]).size == (1000, 560)
    print(f"sd15_gfcg_cfg: 64x64, 2 steps, {seconds:.0f} s over HTTP; image and trace fetched through /view")
