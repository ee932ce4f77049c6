"""The bad-input matrix at the framework-free layer (runs in CI, without ComfyUI).

The same bad inputs as ``test_comfy_bad_inputs.py`` (which posts them to a real ComfyUI server),
sent straight to the functions the nodes call: each must raise an error whose message names the
input and what is allowed. Inputs that ComfyUI itself refuses before any pack code runs (a number
outside a widget's min/max, an unknown combo value, a missing file) are checked here against the
pack's own second line of defence.
"""
import math

import pytest
import torch

from comfyui_gfcg.classifiers.clip_classifier import class_names_for, templates_for
from comfyui_gfcg.classifiers.timm_classifier import load_timm_classifier, save_timm_classifier
from comfyui_gfcg.classifiers.vocab import resolve_class
from comfyui_gfcg.edm2 import CheckpointError, read_checkpoint
from comfyui_gfcg.edm2.network import EDM2
from comfyui_gfcg.guiders.config import GFCGConfig, GFCGInputError
from comfyui_gfcg.guiders.engine import GFCGEngine
from comfyui_gfcg.guiders.gradient import CGConfig
from comfyui_gfcg.testbed.models import load_testbed

NAMES = [f"shape {i}" for i in range(10)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "empty.safetensors").write_bytes(b"")
    (d / "corrupt.safetensors").write_bytes(b"\x07" * 300)
    (d / "text.pth").write_text("this is not a checkpoint\n")
    (d / "evil.pt").write_bytes(b"cos\nsystem\n(S'touch " + str(d / "SENTINEL").encode() + b"'\ntR.")
    (d / "model.onnx").write_bytes(b"x")
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "no_arch.safetensors"))
    save_timm_classifier(str(d / "five_names.safetensors"), net, "test_resnet", class_names=[f"c{i}" for i in range(5)])
    return d


def config(**kw):
    return lambda f: GFCGConfig(**{"desired_class": 3, **kw})


def clf(name, arch=""):
    return lambda f: load_timm_classifier(str(f / name), arch)


def edm2_input(shape):
    def run(f):
        net = load_testbed("float32").main
        net.check_input(torch.zeros(shape))
    return run


CASES = [
    # (id, call(files), exception type, words)
    ("class index out of range", lambda f: resolve_class("10", NAMES), GFCGInputError, ["desired_class", "10", "0..9"]),
    ("unknown class name", lambda f: resolve_class("zebra", NAMES), GFCGInputError,
     ["desired_class", "unknown class name 'zebra'", "0..9"]),
    ("empty class name", lambda f: resolve_class("", NAMES), GFCGInputError, ["desired_class", "0..9"]),
    ("negative class index", config(desired_class=-3), GFCGInputError, ["desired_class", ">= 0"]),
    ("tau above 1", config(tau=1.5), GFCGInputError, ["tau", "1.5", "[0.0, 1.0]"]),
    ("tau below 0", config(tau=-0.2), GFCGInputError, ["tau", "-0.2", "[0.0, 1.0]"]),
    ("tau NaN", config(tau=math.nan), GFCGInputError, ["tau", "nan"]),
    ("negative alpha", config(alpha=-1.0), GFCGInputError, ["alpha", "-1.0", "[0.0"]),
    ("beta 0", config(beta=0.0), GFCGInputError, ["beta", "(0.0"]),
    ("period 0", config(period=0), GFCGInputError, ["period", "0", ">= 1"]),
    ("fractional period", config(period=1.5), GFCGInputError, ["period", "1.5"]),
    ("window start after end", config(window_start=0.6, window_end=0.4), GFCGInputError,
     ["window_start (0.6) must be smaller than window_end (0.4)"]),
    ("window start equals end", config(window_start=0.5, window_end=0.5), GFCGInputError,
     ["window_start (0.5) must be smaller than window_end (0.5)"]),
    ("window end above 1", config(window_end=1.5), GFCGInputError, ["window_end", "1.5"]),
    ("unknown reference mode", config(reference_mode="random"), GFCGInputError, ["reference_mode", "'random'"]),
    ("fixed reference without a class", config(reference_mode="fixed"), GFCGInputError, ["fixed_reference"]),
    ("fixed reference = desired class", config(reference_mode="fixed", fixed_reference=3), GFCGInputError,
     ["fixed_reference", "desired class"]),
    ("temperature 0", config(temperature=0.0), GFCGInputError, ["temperature", "(0.0"]),
    ("unknown classify input", config(classify_input="next"), GFCGInputError, ["classify_input", "'next'"]),
    ("unknown combine mode", lambda f: GFCGEngine(GFCGConfig(desired_class=0), combine="cfg", mode="both"), ValueError,
     ["mode", "'both'", "additive"]),
    ("gradient guidance: negative scale", lambda f: CGConfig(desired_class=0, scale=-0.1), GFCGInputError, ["scale"]),
    # classifier files
    ("missing classifier file", clf("missing.safetensors", "test_resnet"), GFCGInputError, ["not found", "missing"]),
    ("empty classifier file", clf("empty.safetensors", "test_resnet"), GFCGInputError, ["empty.safetensors", "empty"]),
    ("corrupt classifier file", clf("corrupt.safetensors", "test_resnet"), GFCGInputError,
     ["corrupt.safetensors", "not a readable safetensors"]),
    ("wrong-format classifier file", clf("text.pth", "test_resnet"), GFCGInputError, ["text.pth", "weights-only"]),
    ("unsupported extension", clf("model.onnx", "test_resnet"), GFCGInputError, ["model.onnx", ".onnx"]),
    ("malicious classifier pickle", clf("evil.pt", "test_resnet"), GFCGInputError, ["evil.pt", "weights-only"]),
    ("no architecture in metadata, none given", clf("no_arch.safetensors"), GFCGInputError,
     ["architecture", "no_arch.safetensors"]),
    ("unknown timm architecture", clf("no_arch.safetensors", "resnet9999"), GFCGInputError,
     ["architecture", "'resnet9999' is not a timm architecture"]),
    ("weights of another architecture", clf("no_arch.safetensors", "resnet18"), GFCGInputError,
     ["does not match architecture 'resnet18'"]),
    ("class count differs from its vocabulary", clf("five_names.safetensors"), GFCGInputError,
     ["has 10 outputs but its class_names list has 5"]),
    # zero-shot classes and templates
    ("empty class list", lambda f: class_names_for("list", ""), GFCGInputError, ["class_list", "at least two"]),
    ("class list file not chosen", lambda f: class_names_for("file", "", None), GFCGInputError, ["class_file", ".txt"]),
    ("empty prompt template", lambda f: templates_for("custom", ""), GFCGInputError,
     ["custom_templates", "one template per line"]),
    ("huge prompt template", lambda f: templates_for("custom", "a photo of a {} " + "x" * 20000), GFCGInputError,
     ["custom_templates", "too long", "300"]),
    ("too many prompt templates", lambda f: templates_for("custom", "\n".join(["a {}"] * 1001)), GFCGInputError,
     ["custom_templates", "1001 templates", "1000"]),
    ("template without the class slot", lambda f: templates_for("custom", "a photo"), GFCGInputError,
     ["custom_templates", "needs '{}'"]),
    # EDM2 inputs and files
    ("EDM2 latent of the other family", edm2_input((1, 4, 32, 32)), ValueError,
     ["latent_image", "[B, 3, H, W]", "img64"]),
    ("side not divisible by the network's factor", edm2_input((1, 3, 30, 30)), ValueError,
     ["latent_image", "30x30", "multiples of 4"]),
    ("malicious EDM2 pickle", lambda f: read_checkpoint(str(f / "evil.pt").replace(".pt", ".pkl")), CheckpointError,
     ["evil.pkl"]),
    ("unsupported EDM2 extension", lambda f: read_checkpoint(str(f / "model.onnx")), CheckpointError, [".onnx"]),
]


def test_matrix_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_core(files, case):
    name, call, exc, words = case
    if name == "malicious EDM2 pickle":
        (files / "evil.pkl").write_bytes((files / "evil.pt").read_bytes())
    with pytest.raises(exc) as ei:
        call(files)
    msg = str(ei.value)
    missing = [w for w in words if w not in msg]
    assert not missing, f"{name}: message lacks {missing}: {msg}"
    assert not (files / "SENTINEL").exists()


def test_edm2_network_takes_good_inputs():
    """The input check lets the shapes the network takes through (so the errors above are not blanket refusals)."""
    net = EDM2.__new__(EDM2)   # only the config is read
    from comfyui_gfcg.edm2.network import EDM2Config

    net.config = EDM2Config(img_resolution=32, img_channels=3, label_dim=10, channel_mult=(1, 2, 2))
    net.check_input(torch.zeros(2, 3, 32, 32))
    net.check_input(torch.zeros(1, 3, 8, 12))
    with pytest.raises(ValueError, match="multiples of 4"):
        net.check_input(torch.zeros(1, 3, 8, 10))
