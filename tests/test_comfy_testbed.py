"""The shipped testbed workflow (GFCG + autoguidance on the pack's 16x16 testbed models), run
through ComfyUI's HTTP API, against the headless sampler on the same seed and settings; and the
editor form of the workflow against its API form."""
import json
import urllib.request

import pytest
import torch

from conftest import REPO, api_post, api_wait
from workflow_format import strip_meta

pytestmark = pytest.mark.comfy
API = REPO / "workflows" / "api" / "testbed_gfcg_atg.json"
UI = REPO / "workflows" / "testbed_gfcg_atg.json"


def _object_info(url):
    return json.load(urllib.request.urlopen(url + "/object_info", timeout=60))


def test_editor_workflows_are_listed_as_templates(server):
    """ComfyUI lists a pack's workflows/*.json as templates (not sub-folders): the editor forms
    are there, the API forms (workflows/api/) are not."""
    url, _, _ = server
    listed = json.load(urllib.request.urlopen(url + "/workflow_templates", timeout=30)).get("comfyui-gfcg", [])
    assert sorted(listed) == sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert "testbed_gfcg_atg" in listed
    served = urllib.request.urlopen(f"{url}/api/workflow_templates/comfyui-gfcg/testbed_gfcg_atg.json", timeout=30)
    assert json.load(served) == json.loads(UI.read_text())


def _comfy_sigmas(steps):
    """The sigmas ComfyUI's BasicScheduler(karras) gives an EDM2 model (its own code, in this process)."""
    from conftest import load_comfy

    load_comfy()
    import comfy.model_sampling
    import comfy.samplers

    from comfyui_gfcg.edm2.comfy_model import SAMPLING

    ms = comfy.model_sampling.ModelSamplingContinuousEDM()
    ms.set_parameters(SAMPLING["sigma_min"], SAMPLING["sigma_max"], SAMPLING["sigma_data"])
    return comfy.samplers.calculate_sigmas(ms, "karras", steps).float()


def test_testbed_workflow_reproduces_the_headless_sampler(server):
    from safetensors.torch import load_file

    from comfyui_gfcg.guiders.config import GFCGConfig
    from comfyui_gfcg.testbed.models import load_testbed
    from comfyui_gfcg.testbed.sampler import sample

    url, _, base = server
    api = json.loads(API.read_text())
    prompt = strip_meta(api)
    prompt["99"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "gfcg_parity"}}
    pid = api_post(url, "/prompt", {"prompt": prompt})["prompt_id"]
    h = api_wait(url, pid)
    assert h["status"]["status_str"] == "success", h["status"]
    msgs = {m[0]: m[1] for m in h["status"]["messages"]}
    seconds = (msgs["execution_success"]["timestamp"] - msgs["execution_start"]["timestamp"]) / 1000
    lat = h["outputs"]["99"]["latents"][0]
    latent_file = base / "out" / lat["subfolder"] / lat["filename"]
    comfy_x = load_file(str(latent_file))["latent_tensor"].float()

    g, c, s = api["6"]["inputs"], api["7"]["inputs"], api["10"]["inputs"]
    cfg = GFCGConfig(desired_class=6, tau=g["tau"], alpha=g["alpha"], beta=g["beta"], window_start=g["window_start"],
                     window_end=g["window_end"], period=g["period"], reference_mode=g["reference"],
                     classify_input=g["classify_input"], temperature=g["temperature"],
                     settle_after=g["settle_after"])
    from comfyui_gfcg.testbed.bench import stack_mode   # the Combiner's auto = swap on autoguidance
    tb = load_testbed("float32")
    n = api["5"]["inputs"]["batch_size"]
    sigmas = _comfy_sigmas(s["steps"])
    r = sample(tb.main, tb.guidance_classifier, "gfcg+atg", 6, n, seed=api["8"]["inputs"]["noise_seed"],
               guide=tb.guide, atg_scale=c["scale"], gfcg=cfg, mode=stack_mode("gfcg+atg", c["mode"]), sigmas=sigmas)
    diff = (comfy_x - r.images).abs().max().item()
    print(f"ComfyUI run {seconds:.2f} s; max |ComfyUI - headless| = {diff:.3g} (pixels in [-1, 1])")
    res = api["5"]["inputs"]["resolution"]
    assert res == tb.main.config.img_resolution                # the workflow draws at the model's own size
    assert comfy_x.shape == r.images.shape == (n, 3, res, res)
    # The same noise, sigmas, decisions and arithmetic; only the preconditioning is written in a
    # different order of float32 operations (ComfyUI's model_sampling vs the EDM2 module), so
    # agreement is to round-off: well below one 8-bit level (2/255 in [-1, 1]).
    assert diff < 1e-3
    png = h["outputs"]["14"]["images"]
    assert len(png) == n
