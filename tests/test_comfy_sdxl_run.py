"""The shipped SDXL workflow samples end to end over ComfyUI's HTTP API: a full-size SDXL base 1.0
checkpoint with random weights (the 2.6 B-parameter UNet, CLIP-L and OpenCLIP bigG text encoders,
the VAE; fp16 on disk, 6.9 GB as the published file) is written under the user's file name
``sd_xl_base_1.0.safetensors``, loaded by CheckpointLoaderSimple (ComfyUI recognises SDXL by its
layer shapes and builds its two text encoders at their published size, so nothing smaller would
do), and ``sdxl_gfcg_cfg`` runs at 64 x 64 pixels for 2 steps with the positive's size conditioning
as shipped (1024 x 1024); the image and the trace plot come back through ``/view``.

The file is written tensor by tensor (shapes from ComfyUI's own modules built on the meta device,
values drawn one tensor at a time), so writing it needs no more memory than its largest tensor.
The server runs with ComfyUI's CPU defaults: the UNet in fp32 (10.3 GB), the text encoders in
fp16 (1.6 GB), the VAE in fp32; the test skips with the reason where the machine has less than
16 GB of memory available. Then the same graph runs three more times with the models loaded (GFCG
off, on, on with classify_input = previous) and prints what each took against CFG alone.

Cost on 2 shared CPU cores (measured, v0.33.0 and v0.3.64): writing the file 41-51 s, the first
run 54-64 s (load, text encoding, 2 steps of 9-11 s each, decode, trace); about 3 minutes in all
with the three timed reruns. The server's peak resident set is 18.6-18.9 GB, the 6.9 GB of the checkpoint it maps included;
the machine's used memory rose by about 13 GB. Recorded in docs/text_to_image.md.

The random weights are drawn with a small standard deviation so that every number stays finite;
the pictures mean nothing, the plumbing is the point."""
import json
import re
import struct
import time

import pytest
import torch

from conftest import COMFYUI, REPO, SKIP_REASON, api_post, api_wait, load_comfy, run_server, one_reference_on_cpu, small_text_prompt, view_image

pytestmark = pytest.mark.comfy

CKPT = "sd_xl_base_1.0.safetensors"
NEEDS_GB = 16          # available memory the run needs (the server's peak is printed)

# ComfyUI's SDXL UNet configuration (comfy/model_detection.py, the "SDXL" entry): the published
# architecture of stabilityai/stable-diffusion-xl-base-1.0
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _mem_available_gb() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def sdxl_checkpoint_layout() -> dict:
    """{key: torch.Tensor on the meta device} of an SDXL base checkpoint in the original (SGM) layout:
    the UNet under model.diffusion_model., CLIP-L under conditioner.embedders.0., OpenCLIP bigG (its
    own key names, as the published file) under conditioner.embedders.1.model., the VAE under
    first_stage_model.; built from ComfyUI's modules on the meta device (no memory), and the text
    encoders renamed by ComfyUI's own saving conversion (SDXL.process_clip_state_dict_for_saving)."""
    import comfy.ops
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    out = {}
    with torch.device("meta"):
        unet = UNetModel(**SDXL_UNET, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
        out.update({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()})
        del unet
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
        clip_sd = clip.state_dict()
        del clip
        vae = AutoencoderKL(embed_dim=4, ddconfig=SD_VAE)
        out.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
        del vae
    config = comfy.supported_models.SDXL(SDXL_UNET)
    out.update(config.process_clip_state_dict_for_saving(clip_sd))
    return out


def _value(key: str, like: torch.Tensor, g: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """A real value for a checkpoint tensor: norm scales 1, biases 0, position ids 0..n-1, the
    logit scale log(100), everything else N(0, std^2), in fp16 (ids in int64)."""
    shape = tuple(like.shape)
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
    if key.endswith("logit_scale"):
        return torch.full(shape, 4.6052, dtype=torch.float16)
    if key.endswith("bias") and len(shape) == 1:
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 1 and (key.endswith("weight") or key.endswith("scale")):   # norm scales
        return torch.ones(shape, dtype=torch.float16)
    return (torch.randn(shape, generator=g) * std).to(torch.float16)


_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}


def write_streamed_safetensors(path, layout: dict, value) -> int:
    """A .safetensors file of ``layout``'s keys (meta tensors: shapes), each tensor's data from
    ``value(key, meta)`` made and written one at a time; returns the number of parameters."""
    header, offset, dtypes = {}, 0, {}
    for k, meta in layout.items():
        dt = torch.int64 if k.endswith("position_ids") else torch.float16
        n = int(torch.Size(meta.shape).numel()) * dt.itemsize
        header[k] = {"dtype": _DTYPES[dt], "shape": list(meta.shape), "data_offsets": [offset, offset + n]}
        dtypes[k] = dt
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                       # the data starts 8-byte aligned
    g = torch.Generator().manual_seed(0)
    params = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k, meta in layout.items():
            t = value(k, meta, g)
            assert t.dtype == dtypes[k] and tuple(t.shape) == tuple(meta.shape), k
            f.write(t.contiguous().numpy().tobytes())
            if t.is_floating_point():
                params += t.numel()
    return params


@pytest.fixture(scope="module")
def sdxl_server(tmp_path_factory):
    import os

    import timm
    from safetensors.torch import save_file

    if COMFYUI is None:
        pytest.skip(SKIP_REASON)
    free = _mem_available_gb()
    if free < NEEDS_GB:
        pytest.skip(f"the full-size SDXL run needs about {NEEDS_GB} GB of available memory, this machine has "
                    f"{free:.1f} GB")
    load_comfy()
    base = tmp_path_factory.mktemp("sdxl_server")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO, base / "custom_nodes" / "comfyui-gfcg")
    for sub in ("checkpoints", "gfcg_classifiers"):
        (base / "models" / sub).mkdir(parents=True)
    t0 = time.time()
    ckpt = base / "models" / "checkpoints" / CKPT
    n = write_streamed_safetensors(ckpt, sdxl_checkpoint_layout(), _value)
    assert 3.4e9 < n < 3.6e9, n             # UNet 2.567 B + CLIP-L 123 M + bigG 695 M + VAE 84 M
    torch.manual_seed(0)
    net = timm.create_model("resnet50", pretrained=False, num_classes=1000)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(base / "models" / "gfcg_classifiers" / "resnet50.a1_in1k.safetensors"))
    del net
    written = time.time() - t0
    print(f"\nSDXL stand-in written in {written:.0f} s ({ckpt.stat().st_size / 1e9:.2f} GB, {n / 1e9:.3f} B parameters)")
    cfg = base / "extra_model_paths.yaml"
    cfg.write_text(f"gfcg_sdxl:\n  base_path: {base}\n  custom_nodes: custom_nodes\n  checkpoints: models/checkpoints\n"
                   f"  gfcg_classifiers: models/gfcg_classifiers\n")
    try:
        with run_server(base, ["--extra-model-paths-config", str(cfg)]) as url:
            yield url, base
    finally:
        ckpt.unlink(missing_ok=True)      # 6.9 GB: not left in pytest's kept temp folders


def _peak_rss_gb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def test_sdxl_workflow_runs_over_http(sdxl_server):
    url, base = sdxl_server
    prompt = one_reference_on_cpu(small_text_prompt("sdxl_gfcg_cfg", size=64, steps=2), "tabby cat")
    kinds = {v["class_type"] for v in prompt.values()}
    assert {"CheckpointLoaderSimple", "CLIPTextEncodeSDXL", "GFCGGuider", "GFCGCombiner",
            "SamplerCustomAdvanced"} <= kinds
    t0 = time.time()
    h = api_wait(url, api_post(url, "/prompt", {"prompt": prompt})["prompt_id"], timeout=1200)
    seconds = time.time() - t0
    assert h["status"]["status_str"] == "success", h["status"]
    saved = next(o["images"] for k, o in h["outputs"].items() if prompt[k]["class_type"] == "SaveImage")
    assert view_image(url, saved[0]).size == (64, 64)
    trace = next(o["images"] for k, o in h["outputs"].items() if prompt[k]["class_type"] == "PreviewImage")
    assert view_image(url, trace[0]).size == (1000, 560)
    log = (base / "server.log").read_text()
    # ComfyUI took the file for SDXL (its model class and its two-encoder CLIP), not for another family
    assert "Requested to load SDXL" in log and "SDXLClipModel" in log, log[-3000:]
    peak = _peak_rss_gb(int((base / "server.pid").read_text()))
    print(f"sdxl_gfcg_cfg: 64x64, 2 steps, {seconds:.0f} s over HTTP (load, encode, sample, decode, trace); "
          f"server peak RSS {peak:.1f} GB (the checkpoint's pages it maps included)")
    # GFCG's cost on SDXL: the same graph, models cached, with GFCG off (tau 0: CFG alone, the
    # classifier never runs) and on (tau 0.5; the random classifier doubts every sample at every
    # step, so each step evaluates the reference branch too: GFCG's worst case); another seed so
    # that the sampler runs again. ComfyUI's own "Prompt executed in" times.
    # classify_input = previous classifies the last step's estimate, so the reference joins the
    # step's one forward instead of a second one after the classifier.
    times = {}
    for label, tau, when in (("CFG alone (tau 0)", 0.0, "current"), ("GFCG + CFG additive", 0.5, "current"),
                             ("GFCG + CFG additive, classify previous", 0.5, "previous")):
        p = json.loads(json.dumps(prompt))
        for v in p.values():
            if v["class_type"] == "GFCGGuider":
                v["inputs"].update(tau=tau, classify_input=when)
            if v["class_type"] == "RandomNoise":
                v["inputs"]["noise_seed"] = 1
        h = api_wait(url, api_post(url, "/prompt", {"prompt": p})["prompt_id"], timeout=1200)
        assert h["status"]["status_str"] == "success", h["status"]
        times[label] = float(re.findall(r"Prompt executed in ([\d.]+) seconds", (base / "server.log").read_text())[-1])
    base_t = times["CFG alone (tau 0)"]
    print("sampling 2 steps + decode + trace, models loaded: " +
          ", ".join(f"{k} {t:.1f} s ({t / base_t:.2f} x)" for k, t in times.items()))
