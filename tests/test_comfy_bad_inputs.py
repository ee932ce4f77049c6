"""The bad-input matrix, through a real ComfyUI server's HTTP API.

Each case is a prompt with one bad input (or an edge case that must work), posted to /prompt.
A bad input must be refused by ComfyUI's validation (HTTP 400 with node errors) or fail at
execution (``execution_error`` in /history) with a message that names the input and says what is
allowed. After every case the server must still serve, and the next good prompt (the shipped
testbed workflow at 2 steps, a new seed each time, so it really runs) must succeed.
"""
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import pytest

from conftest import api_submit as submit
from conftest import make_testbed_prompt as make_prompt

pytestmark = pytest.mark.comfy

# node ids of the testbed workflow
MAIN, GUIDE, CLF, LABEL, LATENT, GFCG, COMB, NOISE, SCHED, SAMPLER = "1", "2", "3", "4", "5", "6", "7", "8", "10", "11"


# ------------------------------------------------------------------------------ files for the cases
@pytest.fixture(scope="module")
def matrix_server(server):
    """The session's server, with the files the cases need written into its folders."""
    import timm
    import torch
    from safetensors.torch import save_file

    import edm2_helpers as H
    from comfyui_gfcg.classifiers import save_timm_classifier

    url, log, base = server
    m = base / "models"
    clf = m / "gfcg_classifiers"
    (clf / "mx_empty.safetensors").write_bytes(b"")
    (clf / "mx_corrupt.safetensors").write_bytes(b"\x07" * 300)
    (clf / "mx_text.pth").write_text("this is not a checkpoint\n")
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(clf / "mx_no_arch.safetensors"))
    save_timm_classifier(str(clf / "mx_five_names.safetensors"), net, "test_resnet",
                         class_names=[f"c{i}" for i in range(5)], data_config={"input_size": [3, 32, 32]})
    big = timm.create_model("test_resnet", pretrained=False, num_classes=1000)
    save_timm_classifier(str(clf / "mx_1000.safetensors"), big, "test_resnet", data_config={"input_size": [3, 32, 32]})
    evil = clf / "mx_evil.pt"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(base / "SENTINEL").encode() + b"'\ntR.")
    cfg512 = H.small_cfg("img512", 1000)
    (m / "edm2" / "mx-img512-tiny.pkl").write_bytes(H.nvlabs_pickle_bytes(cfg512, H.random_state_dict(cfg512, 3),
                                                                         base / "SENTINEL", "stability"))
    # TAESD (4 latent channels) and TAESD3 (16) with random weights: VAELoader lists "taesd" / "taesd3"
    import conftest

    conftest.load_comfy()
    import comfy_models as cm

    approx = m / "vae_approx"
    approx.mkdir(exist_ok=True)
    for prefix, ch in (("taesd", 4), ("taesd3", 16)):
        sd = cm.random_taesd_state(ch, seed=ch)
        for part in ("encoder", "decoder"):
            save_file({k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(f"taesd_{part}.")},
                      str(approx / f"{prefix}_{part}.safetensors"))
    (m / "gfcg_clip").mkdir(exist_ok=True)
    (m / "gfcg_clip" / "mx_clip.safetensors").write_bytes(b"placeholder: the cases stop at validation")
    (base / "in").mkdir(exist_ok=True)
    save_file({"latent_tensor": torch.full((1, 3, 32, 32), float("nan")),
                  "latent_format_version_0": torch.tensor([])}, str(base / "in" / "mx_nan.latent"))
    x = torch.zeros(1, 3, 32, 32)
    x[0, 1, 5, 5] = float("inf")
    save_file({"latent_tensor": x, "latent_format_version_0": torch.tensor([])}, str(base / "in" / "mx_inf.latent"))
    return server


# ------------------------------------------------------------------------------ prompts
def gfcg_alone(p):
    """The testbed prompt with the GFCG Guider straight into the sampler (no combiner)."""
    p[SAMPLER]["inputs"]["guider"] = [GFCG, 0]
    del p[COMB], p[GUIDE]
    return p


def set_(node, **kw):
    def f(p):
        p[node]["inputs"].update(kw)
        return p
    return f


def chain(*fns):
    def f(p):
        for fn in fns:
            p = fn(p)
        return p
    return f


def latent_model(vae: Optional[str]):
    """GFCG alone on a tiny img512 (latent) EDM2 net, with the given VAE (None: no VAE input)."""
    def f(p):
        p = gfcg_alone(p)
        p[MAIN]["inputs"]["ckpt_name"] = "mx-img512-tiny.pkl"
        p[LATENT]["inputs"].update(family="img512", resolution=8)
        p[LABEL]["inputs"].update(class_name="207", num_classes=1000)
        if vae is not None:
            p["20"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae}}
            p[GFCG]["inputs"]["vae"] = ["20", 0]
        del p["13"], p["14"]
        p["99"] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0], "filename_prefix": "mx"}}
        return p
    return f


def ksampler(p):
    """The testbed main model sampled by a plain KSampler (no GFCG): EDM2 model-level checks."""
    keep = {k: p[k] for k in (MAIN, LABEL, LATENT)}
    keep["30"] = {"class_type": "KSampler", "inputs": {"model": [MAIN, 0], "seed": 0, "steps": 2, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "karras",
                                                       "positive": [LABEL, 0], "negative": [LABEL, 0],
                                                       "latent_image": [LATENT, 0], "denoise": 1.0}}
    keep["31"] = {"class_type": "SaveLatent", "inputs": {"samples": ["30", 0], "filename_prefix": "mx"}}
    return keep


def load_latent(name):
    def f(p):
        p["40"] = {"class_type": "LoadLatent", "inputs": {"latent": name}}
        p[SAMPLER]["inputs"]["latent_image"] = ["40", 0]
        return p
    return f


def zero_shot(**kw):
    """The zero-shot loader as the GFCG classifier (validation-stage cases: the file is a placeholder)."""
    def f(p):
        inputs = {"clip_name": "mx_clip.safetensors", "architecture": "ViT-B-32", "class_source": "list",
                  "class_list": "cat\ndog", "class_file": "(none)", "templates": "a photo of a {}.",
                  "custom_templates": "a photo of a {}."}
        inputs.update(kw)
        p["50"] = {"class_type": "GFCGLoadZeroShotClassifier", "inputs": inputs}
        p[GFCG]["inputs"]["classifier"] = ["50", 0]
        return p
    return f


def gradient_guider(**kw):
    def f(p):
        inputs = {"model": [MAIN, 0], "positive": [LABEL, 0], "classifier": [CLF, 0], "desired_class": "triangle up",
                  "scale": 0.02, "gamma": 0.3, "softplus_beta": 5.0, "tau1": 1.0, "tau2": 0.0,
                  "classifier_input": "denoised", "cfg": 1.0}
        inputs.update(kw)
        p["60"] = {"class_type": "GFCGClassifierGuidance", "inputs": inputs}
        p[SAMPLER]["inputs"]["guider"] = ["60", 0]
        del p[COMB], p[GUIDE], p[GFCG]
        return p
    return f


@dataclass
class Case:
    id: str
    patch: Callable
    stage: str                      # validation | execution | refused (either) | success
    words: List[str] = field(default_factory=list)


G = GFCG
CASES = [
    # --- GFCG settings
    Case("class index out of range", set_(G, desired_class="10"), "execution", ["desired_class", "10", "0..9"]),
    Case("unknown class name", set_(G, desired_class="zebra"), "execution",
         ["desired_class", "unknown class name 'zebra'", "0..9"]),
    Case("empty desired class", set_(G, desired_class=""), "validation", ["desired_class", "class name"]),
    Case("negative class index", set_(G, desired_class="-3"), "validation", ["desired_class", "-3", ">= 0"]),
    Case("tau above 1", set_(G, tau=1.5), "validation", ["tau", "1.5", "1.0"]),
    Case("tau below 0", set_(G, tau=-0.2), "validation", ["tau", "-0.2", "0.0"]),
    Case("negative alpha", set_(G, alpha=-1.0), "validation", ["alpha", "-1.0", "0.0"]),
    Case("beta 0", set_(G, beta=0.0), "validation", ["beta", "0.01"]),
    Case("period 0", set_(G, period=0), "validation", ["period", "0", "1"]),
    Case("window start after end", set_(G, window_start=0.6, window_end=0.4), "validation",
         ["window_start (0.6) must be smaller than window_end (0.4)"]),
    Case("window start equals end", set_(G, window_start=0.5, window_end=0.5), "validation",
         ["window_start (0.5) must be smaller than window_end (0.5)"]),
    Case("unknown reference mode", set_(G, reference="random"), "refused", ["reference", "random", "deterministic"]),
    Case("fixed reference without a class", set_(G, reference="fixed", fixed_reference_class=""), "execution",
         ["fixed_reference_class", "class name"]),
    Case("fixed reference = desired class", set_(G, reference="fixed", fixed_reference_class="triangle up"),
         "execution", ["fixed_reference", "is the desired class"]),
    Case("temperature 0", set_(G, temperature=0.0), "validation", ["temperature", "0.01"]),
    Case("unknown decode", set_(G, decode="jpeg"), "refused", ["decode", "jpeg", "latent_rgb"]),
    Case("decode resolution below 0", set_(G, decode_resolution=-0.5), "validation", ["decode_resolution", "0.0"]),
    Case("settle_after below 0", set_(G, settle_after=-1), "validation", ["settle_after", "0"]),
    Case("unknown classify input", set_(G, classify_input="next"), "refused", ["classify_input", "next"]),
    # --- combiner and guide model
    Case("cfg without negative", set_(COMB, combine_with="cfg"), "execution", ["negative", "needs the negative"]),
    Case("autoguidance without guide", lambda p: (p[COMB]["inputs"].pop("guide_model"), p)[1], "execution",
         ["guide_model", "needs a guide model"]),
    Case("guide = main model", set_(COMB, guide_model=[MAIN, 0]), "execution", ["guide_model", "same network"]),
    Case("guide of another latent shape", set_(GUIDE, ckpt_name="mx-img512-tiny.pkl"), "execution",
         ["guide_model", "4-channel", "3-channel", "same family and latent space"]),
    Case("guide of another architecture (classes)", set_(GUIDE, ckpt_name="edm2-img64-tiny.pkl"), "execution",
         ["guide_model", "1000 class labels", "main model 10"]),
    Case("negative scale", set_(COMB, scale=-1.0), "validation", ["scale", "-1.0", "0.0"]),
    Case("unknown combine mode", set_(COMB, mode="both"), "refused", ["mode", "both", "additive"]),
    # --- classifier files
    Case("missing classifier file", set_(CLF, classifier_name="mx_missing.safetensors"), "validation",
         ["classifier_name", "mx_missing.safetensors"]),
    Case("empty classifier file", set_(CLF, classifier_name="mx_empty.safetensors", architecture="test_resnet"),
         "execution", ["classifier_name", "mx_empty.safetensors", "is empty"]),
    Case("corrupt classifier file", set_(CLF, classifier_name="mx_corrupt.safetensors", architecture="test_resnet"),
         "execution", ["classifier_name", "mx_corrupt.safetensors", "not a readable safetensors"]),
    Case("wrong-format classifier file", set_(CLF, classifier_name="mx_text.pth", architecture="test_resnet"),
         "execution", ["classifier_name", "mx_text.pth", "weights-only"]),
    Case("no architecture in metadata, none given", set_(CLF, classifier_name="mx_no_arch.safetensors"), "validation",
         ["architecture", "mx_no_arch.safetensors", "names no architecture"]),
    Case("unknown timm architecture", set_(CLF, classifier_name="mx_no_arch.safetensors", architecture="resnet9999"),
         "execution", ["architecture", "'resnet9999' is not a timm architecture"]),
    Case("weights of another architecture", set_(CLF, classifier_name="mx_no_arch.safetensors", architecture="resnet18"),
         "execution", ["classifier_name", "does not match architecture 'resnet18'"]),
    Case("class count differs from its vocabulary", set_(CLF, classifier_name="mx_five_names.safetensors"),
         "execution", ["classifier_name", "has 10 outputs but its class_names list has 5"]),
    Case("classifier classes differ from the model's labels",
         chain(set_(CLF, classifier_name="mx_1000.safetensors"), set_(G, desired_class="6")), "execution",
         ["classifier", "1000 classes", "class labels have 10"]),
    Case("malicious classifier pickle", set_(CLF, classifier_name="mx_evil.pt", architecture="test_resnet"),
         "execution", ["classifier_name", "mx_evil.pt", "weights-only"]),
    # --- VAE and model space
    Case("pixel-space model with a latent VAE", chain(gfcg_alone, lambda p: (
        p.update({"20": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}}),
        p[G]["inputs"].update(vae=["20", 0]), p)[2]), "execution", ["vae", "pixel space", "4-channel"]),
    Case("latent model without a VAE", latent_model(None), "execution", ["vae", "4-channel latents", "connect its VAE"]),
    Case("latent model with the pixel_space VAE", latent_model("pixel_space"), "execution",
         ["vae", "pixel_space VAE cannot decode", "4-channel"]),
    Case("wrong VAE for the model", latent_model("taesd3"), "execution", ["vae", "16-channel", "4-channel"]),
    # --- sizes and latents
    Case("batch size 1", lambda p: p, "success"),
    Case("batch size 16", set_(LATENT, batch_size=16), "success"),
    Case("side not divisible by the network's factor", set_(LATENT, resolution=30), "execution",
         ["latent_image", "30x30", "multiples of 4"]),
    Case("NaN in the input latent", load_latent("mx_nan.latent"), "execution", ["latent_image", "NaN or infinite"]),
    Case("Inf in the input latent", load_latent("mx_inf.latent"), "execution",
         ["latent_image", "1 NaN or infinite values"]),
    # --- EDM2 files and labels
    Case("EDM2 latent of the other family", set_(LATENT, family="img512", resolution=32), "execution",
         ["latent_image", "[B, 3, H, W]", "img64", "(1, 4, 32, 32)"]),
    Case("class label width differs from the EDM2 net", chain(ksampler, set_(LABEL, class_name="6", num_classes=1000)),
         "execution", ["class_labels", "takes 10 classes", "num_classes = 10"]),
    Case("unknown EDM2 class name", set_(LABEL, class_name="zebroid"), "validation", ["class_name", "zebroid"]),
    Case("missing EDM2 file", set_(MAIN, ckpt_name="mx-missing.pkl"), "validation", ["ckpt_name", "mx-missing.pkl"]),
    Case("malicious EDM2 pickle", set_(MAIN, ckpt_name="edm2-evil.pkl"), "execution",
         ["ckpt_name", "refused", "system"]),
    # --- zero-shot classifier inputs
    Case("empty class list", zero_shot(class_list=""), "validation", ["class_list", "at least two class names"]),
    Case("empty prompt template", zero_shot(templates="custom", custom_templates=""), "validation",
         ["custom_templates", "one template per line"]),
    Case("huge prompt template", zero_shot(templates="custom", custom_templates="a photo of a {} " + "x" * 20000),
         "validation", ["custom_templates", "20016 characters is too long", "300"]),
    Case("template without the class slot", zero_shot(templates="custom", custom_templates="a photo"),
         "validation", ["custom_templates", "needs '{}'"]),
    Case("class list file not chosen", zero_shot(class_source="file"), "validation", ["class_file", ".txt"]),
    # --- gradient guider
    Case("gradient guider: class out of range", gradient_guider(desired_class="99"), "execution",
         ["desired_class", "99", "0..9"]),
    Case("gradient guider: negative scale", gradient_guider(scale=-0.1), "validation", ["scale", "-0.1"]),
    Case("gradient guider: cfg without negative", gradient_guider(cfg=2.0), "execution", ["negative", "cfg != 1"]),
]


# ------------------------------------------------------------------------------ running a prompt
def test_matrix_is_large_enough():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


_good_seed = iter(range(1000, 10 ** 6))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(matrix_server, case):
    url, log, base = matrix_server
    stage, out = submit(url, case.patch(make_prompt()))
    text = out if isinstance(out, str) else ""
    allowed = ("validation", "execution") if case.stage == "refused" else (case.stage,)
    assert stage in allowed, f"{case.id}: expected {case.stage}, got {stage}: {text[:1500]}"
    if stage == "success":
        n = case.patch(make_prompt())[LATENT]["inputs"]["batch_size"]
        assert len(out["outputs"]["14"]["images"]) == n
    else:
        missing = [w for w in case.words if w not in text]
        assert not missing, f"{case.id}: message lacks {missing}: {text[:2000]}"
        print(f"{case.id}: {stage}: {text[:400]}")
    assert not (base / "SENTINEL").exists()
    # the server keeps serving, and the next good prompt runs (a new seed: not a cached result)
    urllib.request.urlopen(url + "/system_stats", timeout=10)
    stage, h = submit(url, make_prompt(seed=next(_good_seed)))
    assert stage == "success", f"after {case.id}: {h if isinstance(h, str) else h['status']}"
    assert not any(m[0] == "execution_cached" and SAMPLER in m[1]["nodes"] for m in h["status"]["messages"])
