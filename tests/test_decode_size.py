"""decode_resolution = auto (no ComfyUI): the latent is shrunk to just what the classifier's own
preprocessing keeps, for timm's and open_clip's resize rules."""
import pytest
import torch

from comfyui_gfcg.classifiers.timm_classifier import DataConfig, ImageClassifier
from comfyui_gfcg.guiders.pixels import auto_latent_size


def _clf(size=224, crop_pct=0.95, crop_mode="center"):
    return ImageClassifier(torch.nn.Conv2d(3, 2, 1), DataConfig(input_size=(3, size, size), crop_pct=crop_pct,
                                                               crop_mode=crop_mode), ["a", "b"])


def test_resize_size_is_the_rule_preprocess_applies():
    """The factored-out rule is what preprocess does: the image it resizes has that size."""
    clf = _clf()
    seen = {}
    orig = torch.nn.functional.interpolate

    def spy(x, size=None, **kw):
        seen["size"] = tuple(size)
        return orig(x, size=size, **kw)

    torch.nn.functional.interpolate, old = spy, torch.nn.functional.interpolate
    try:
        clf.preprocess(torch.rand(1, 3, 512, 768))
    finally:
        torch.nn.functional.interpolate = old
    assert seen["size"] == clf.resize_size(512, 768) == (235, 352)


@pytest.mark.parametrize("h,w,crop_pct,mode,expect", [
    (64, 64, 0.95, "center", (30, 30)),     # SD 512 px for ResNet-50 a1 (224 / 0.95 = 235 px): a 240 px decode
    (64, 96, 0.95, "center", (30, 45)),     # 512 x 768: the short side decides, the aspect is kept
    (128, 128, 0.875, "center", (32, 32)),  # 1024 px, crop 0.875: 256 px
    (16, 16, 0.95, "center", (16, 16)),     # 128 px: already smaller than what the classifier reads
    (64, 64, 1.0, "squash", (28, 28)),      # squash to 224 x 224
])
def test_auto_latent_size(h, w, crop_pct, mode, expect):
    clf = _clf(crop_pct=crop_pct, crop_mode=mode)
    got = auto_latent_size(h, w, 8, clf.resize_size)
    assert got == expect
    sh, sw = clf.resize_size(8 * h, 8 * w)
    assert 8 * got[0] >= min(sh, 8 * h) and 8 * got[1] >= min(sw, 8 * w)     # the classifier never enlarges
    if got != (h, w):   # and one latent pixel less would make it enlarge
        assert 8 * (got[0] - 1) < sh or 8 * (got[1] - 1) < sw


def test_auto_size_follows_a_zero_shot_classifiers_rule():
    from comfyui_gfcg.classifiers.clip_classifier import ZeroShotClassifier

    clf = ZeroShotClassifier(torch.nn.Conv2d(3, 2, 1), DataConfig(input_size=(3, 224, 224), crop_pct=1.0,
                                                                  crop_mode="center"), ["a", "b"])
    assert auto_latent_size(64, 64, 8, clf.resize_size) == (28, 28)
    assert auto_latent_size(64, 128, 8, clf.resize_size) == (28, 56)
