"""ComfyUI started as a server with the pack in custom_nodes: no import errors, every node in
/object_info with a description and a tooltip on every input."""
import json
import urllib.request

import pytest

from conftest import api_post, api_wait

pytestmark = pytest.mark.comfy
PACK_NODES = ("GFCGLoadImageClassifier", "GFCGGuider", "GFCGCombiner", "GFCGLoadEDM2Model", "GFCGEDM2ClassLabel",
              "GFCGEDM2EmptyLatent", "GFCGEDM2VAEDecode", "GFCGEDM2VAEEncode")


def test_pack_loads_without_import_errors(server):
    _, log, _ = server
    text = log.read_text()
    pack_lines = [ln for ln in text.splitlines() if "comfyui-gfcg" in ln]
    assert not any("IMPORT FAILED" in ln or "Traceback" in ln for ln in pack_lines), text[-3000:]
    assert "Cannot import" not in "\n".join(pack_lines)


def test_object_info_has_every_node_with_tooltips(server):
    url, _, _ = server
    info = json.load(urllib.request.urlopen(url + "/object_info", timeout=30))
    for name in PACK_NODES:
        assert name in info, f"{name} missing from /object_info"
        node = info[name]
        assert node["description"].strip()
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp}: no tooltip"
        assert all(node.get("output_tooltips", [None]))


def edm2_api_prompt(ckpt):
    return {
        "1": {"class_type": "GFCGLoadEDM2Model", "inputs": {"ckpt_name": ckpt, "weight_dtype": "default"}},
        "2": {"class_type": "GFCGEDM2ClassLabel", "inputs": {"class_name": "goldfish"}},
        "3": {"class_type": "GFCGEDM2ClassLabel", "inputs": {"class_name": "tench"}},
        "4": {"class_type": "GFCGEDM2EmptyLatent", "inputs": {"family": "img64", "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 0, "steps": 4, "cfg": 1.5,
                                                   "sampler_name": "heun", "scheduler": "karras", "positive": ["2", 0],
                                                   "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "7": {"class_type": "GFCGEDM2VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "edm2_api"}},
    }


def test_edm2_headless_api_run_and_refused_checkpoint(server):
    """EDM2 through the HTTP API: a tiny img64 net listed from the yaml-added models/edm2 folder samples
    with KSampler and saves an image; a malicious .pkl fails that prompt with a clear message, the server
    stays up and nothing runs."""
    url, _, base = server
    info = json.load(urllib.request.urlopen(url + "/object_info/GFCGLoadEDM2Model", timeout=30))
    spec = info["GFCGLoadEDM2Model"]["input"]["required"]["ckpt_name"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    assert "edm2-img64-tiny.pkl" in options and "edm2-evil.pkl" in options
    pid = api_post(url, "/prompt", {"prompt": edm2_api_prompt("edm2-img64-tiny.pkl")})["prompt_id"]
    h = api_wait(url, pid)
    assert h["status"]["status_str"] == "success", h["status"]
    imgs = h["outputs"]["8"]["images"]
    assert len(imgs) == 1 and (base / "out" / imgs[0]["filename"]).is_file()

    pid = api_post(url, "/prompt", {"prompt": edm2_api_prompt("edm2-evil.pkl")})["prompt_id"]
    h = api_wait(url, pid)
    assert h["status"]["status_str"] == "error"
    text = json.dumps(h["status"]["messages"])
    assert "ckpt_name: EDM2 checkpoint 'edm2-evil.pkl' refused" in text and "system" in text, text[:2000]
    assert not (base / "SENTINEL").exists()
    urllib.request.urlopen(url + "/system_stats", timeout=10)  # still serving
