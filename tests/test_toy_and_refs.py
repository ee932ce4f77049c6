"""The toy demo (same engine as the guider) and the reference-conditioning sources."""
import pytest
import torch

from comfyui_gfcg.guiders.config import GFCGInputError
from comfyui_gfcg.guiders.references import LabelReference, TextReference
from comfyui_gfcg.testbed.toy import Toy, edm_sigmas, gaussian_denoiser, sample


def test_edm_sigmas_endpoints():
    s = edm_sigmas(32)
    assert len(s) == 33 and s[0].item() == pytest.approx(80.0) and s[31].item() == pytest.approx(0.002) and s[32] == 0


def test_gaussian_denoiser_limits():
    x, m = torch.ones(1, 2, 1, 1) * 3, torch.zeros(1, 2, 1, 1)
    assert torch.allclose(gaussian_denoiser(x, 1e-4, m, 1.0), x, atol=1e-6)      # no noise: identity
    assert torch.allclose(gaussian_denoiser(x, 1e4, m, 1.0), m, atol=1e-6)       # all noise: the mean


def test_toy_gfcg_raises_precision():
    toy = Toy()
    prec = {m: sum(sample(toy, m, c, n=300, seed=c)[1] for c in range(toy.classes)) / toy.classes
            for m in ("none", "gfcg", "atg", "gfcg+atg")}
    assert prec["gfcg"] > prec["none"] + 0.1
    assert prec["gfcg+atg"] > prec["atg"] + 0.1


class StubClip:
    """ComfyUI CLIP's two methods, recording what is encoded."""

    def __init__(self):
        self.encoded = []

    def tokenize(self, text):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens):
        self.encoded.append(tokens["text"])
        return [[torch.full((1, 77, 8), float(len(self.encoded))), {"pooled_output": None}]]


def test_text_reference_template_and_cache():
    clip = StubClip()
    ref = TextReference(clip, "a photo of a {}", ["tench, Tinca tinca", "goldfish, Carassius auratus"])
    a = ref(1)
    b = ref(1)
    ref(0)
    assert clip.encoded == ["a photo of a goldfish", "a photo of a tench"]
    assert a is b


@pytest.mark.parametrize("template", ["no placeholder", "x" * 2001 + "{}"])
def test_text_reference_bad_template(template):
    with pytest.raises(GFCGInputError, match="prompt_template"):
        TextReference(StubClip(), template, ["a"])


def test_label_reference_swaps_the_one_hot():
    pos = [[torch.zeros(1, 1, 1), {"class_labels": torch.eye(5)[[2]], "strength": 1.0}]]
    ref = LabelReference(pos)(4)
    assert ref[0][1]["class_labels"].tolist() == [[0, 0, 0, 0, 1.0]] and ref[0][1]["strength"] == 1.0
    assert pos[0][1]["class_labels"].argmax().item() == 2                        # input untouched
    with pytest.raises(GFCGInputError, match="positive"):
        LabelReference([[torch.zeros(1), {}]])
