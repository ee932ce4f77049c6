"""The EDM2 workflows run end to end through ComfyUI's HTTP API (POST /prompt, poll /history,
fetch the images through /view) with small random-weight stand-ins written under the users' file
names: tiny EDM2 nets in NVlabs' pickle format, the SD VAE architecture, a ResNet-50. The test
lowers steps and resolution in its copy of each workflow; the graph is the shipped one.
(SD1.5 runs in test_comfy_sd15_run.py, with a full-size random-weight checkpoint.)"""
import json

import pytest
import torch

from conftest import REPO, api_post, api_wait, load_comfy, view_image
from workflow_format import strip_meta

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def stand_ins(server):
    import timm
    from safetensors.torch import save_file

    import edm2_helpers as H

    url, _, base = server
    models = base / "models"
    for name, family, seed in (("edm2-img512-s-2147483-0.070.pkl", "img512", 0),
                               ("edm2-img512-xs-0134217-0.125.pkl", "img512", 1),
                               ("edm2-img64-s-1073741-0.075.pkl", "img64", 2)):
        cfg = H.small_cfg(family, 1000)
        enc = "stability" if family == "img512" else "rgb"
        (models / "edm2" / name).write_bytes(H.nvlabs_pickle_bytes(cfg, H.random_state_dict(cfg, seed),
                                                                  base / "SENTINEL", enc))
    torch.manual_seed(0)
    net = timm.create_model("resnet50", pretrained=False, num_classes=1000)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(models / "gfcg_classifiers" / "resnet50.a1_in1k.safetensors"))
    load_comfy()                                     # ComfyUI's own SD VAE architecture, random weights
    from comfyui_gfcg.testbed.decode_bench import sd_vae

    vae, _ = sd_vae(None)
    save_file({k: v.contiguous() for k, v in vae.first_stage_model.state_dict().items()},
              str(models / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors"))
    return server


def _shrink(prompt, steps, resolution):
    for v in prompt.values():
        if v["class_type"] == "BasicScheduler":
            v["inputs"]["steps"] = steps
        if v["class_type"] == "GFCGEDM2EmptyLatent":
            v["inputs"]["resolution"] = resolution
            v["inputs"]["batch_size"] = 2
    return prompt


@pytest.mark.parametrize("name,resolution,pixels", [("edm2_img512_s_gfcg_autoguidance", 8, 64),
                                                    ("edm2_img64_gfcg_cfg", 16, 16)])
def test_edm2_workflow_runs_over_http(stand_ins, name, resolution, pixels):
    url, _, base = stand_ins
    prompt = _shrink(strip_meta(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())), 3, resolution)
    h = api_wait(url, api_post(url, "/prompt", {"prompt": prompt})["prompt_id"])
    assert h["status"]["status_str"] == "success", h["status"]
    assert not (base / "SENTINEL").exists()                  # the pickles' embedded code never ran
    saved = next(o["images"] for k, o in h["outputs"].items() if prompt[k]["class_type"] == "SaveImage")
    assert len(saved) == 2 and view_image(url, saved[0]).size == (pixels, pixels)
    trace = next(o["images"] for k, o in h["outputs"].items() if prompt[k]["class_type"] == "PreviewImage")
    assert view_image(url, trace[0]).size == (1000, 560)
