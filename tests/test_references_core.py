"""The text reference's key rule without ComfyUI: which keys of a CONDITIONING entry are the text
part (replaced by the reference encoding) and which are carried over from the positive."""
import pytest
import torch

from comfyui_gfcg.guiders.config import GFCGInputError
from comfyui_gfcg.guiders.references import TextReference


class DictClip:
    """ComfyUI CLIP's ``tokenize`` / ``encode_from_tokens_scheduled``, returning the entries that
    ``encoder(text)`` gives (a list of (tokens, extras) pairs), with the text's length as tensor value."""

    def __init__(self, encoder):
        self.encoder = encoder

    def tokenize(self, text):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens):
        text = tokens["text"]
        return [[torch.full((1, n, 4), float(len(text))), dict(extras)] for n, extras in self.encoder(text)]


def ref_of(positive, encoder, k=0):
    return TextReference(DictClip(encoder), "a photo of a {}", ["goldfish", "tench"], positive=positive)(k)


def test_attention_mask_of_the_positive_dropped_when_the_encoding_has_none():
    """Encoders leave the mask out when nothing is masked (Qwen-Image, HunyuanVideo): the positive's
    mask, sized for the positive's tokens, must not reach the reference tokens."""
    pos = [[torch.zeros(1, 9, 4), {"pooled_output": torch.ones(1, 4), "attention_mask": torch.ones(1, 9),
                                   "guidance": 4.0, "reference_latents": ["latent"]}]]
    (t, d), = ref_of(pos, lambda text: [(5, {"pooled_output": torch.zeros(1, 4)})])
    assert t.shape == (1, 5, 4) and "attention_mask" not in d
    assert d["guidance"] == 4.0 and d["reference_latents"] is pos[0][1]["reference_latents"]
    assert torch.equal(d["pooled_output"], torch.zeros(1, 4))


def test_every_key_of_the_encoding_is_text_part():
    pos = [[torch.zeros(1, 3, 4), {"pooled_output": None, "conditioning_llama3": "positive's", "lyrics_strength": 0.7,
                                   "unclip_conditioning": ["u"]}]]
    enc = {"pooled_output": None, "conditioning_llama3": "reference's", "some_new_encoder_key": 1}
    (t, d), = ref_of(pos, lambda text: [(2, enc)])
    assert d == {"pooled_output": None, "conditioning_llama3": "reference's", "some_new_encoder_key": 1,
                 "lyrics_strength": 0.7, "unclip_conditioning": ["u"]}


def test_hooks_are_the_positives_not_the_encodings():
    """A CLIP's apply_to_conds hooks patch the diffusion model: both branches run the positive's."""
    mine, clips = object(), object()
    pos = [[torch.zeros(1, 3, 4), {"pooled_output": None, "hooks": mine}]]
    (_, d), = ref_of(pos, lambda text: [(2, {"pooled_output": None, "hooks": clips})])
    assert d["hooks"] is mine
    (_, d), = ref_of([[torch.zeros(1, 3, 4), {"pooled_output": None}]],
                     lambda text: [(2, {"pooled_output": None, "hooks": clips})])
    assert "hooks" not in d


def test_clip_range_without_a_match_takes_every_reference_entry():
    """A positive encoded with a schedule and a CLIP without one (or another schedule): the
    positive's CLIP range is text part, replaced by the encoding's entries."""
    pos = [[torch.zeros(1, 3, 4), {"clip_start_percent": 0.0, "clip_end_percent": 0.5, "area": (8, 8, 0, 0)}],
           [torch.zeros(1, 3, 4), {"clip_start_percent": 0.5, "clip_end_percent": 1.0, "area": (8, 8, 0, 0)}]]
    ref = ref_of(pos, lambda text: [(2, {"pooled_output": None})])
    assert [d for _, d in ref] == [{"pooled_output": None, "area": (8, 8, 0, 0)}] * 2


def test_positive_must_be_a_conditioning():
    for bad in ("text", [[torch.zeros(1)]], [[torch.zeros(1), "not a dict"]], []):
        with pytest.raises(GFCGInputError, match="positive"):
            TextReference(DictClip(lambda t: [(1, {})]), "a photo of a {}", ["a"], positive=bad)
