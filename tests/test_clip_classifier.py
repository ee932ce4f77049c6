"""open_clip zero-shot classifiers from local files (framework-free), on a tiny random-weight model."""
import json
import os
import pickle

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from comfyui_gfcg.classifiers import clip_classifier  # noqa: E402
from comfyui_gfcg.classifiers.clip_classifier import (class_names_for, load_zero_shot_classifier,  # noqa: E402
                                                      parse_class_list, prompt_name, templates_for)
from comfyui_gfcg.guiders.config import GFCGInputError  # noqa: E402

ARCH = "gfcg-tiny-clip"
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def register_tiny(folder) -> str:
    """Add the tiny architecture to open_clip's registry (a config file, as open_clip reads its own)."""
    cfg = os.path.join(folder, f"{ARCH}.json")
    with open(cfg, "w") as f:
        json.dump(TINY, f)
    if ARCH not in open_clip.list_models():
        open_clip.add_model_config(cfg)
    return ARCH


def save_tiny(folder, name="tiny_clip.safetensors", seed=0):
    from safetensors.torch import save_file

    register_tiny(folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH, pretrained=None).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    path = os.path.join(folder, name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path, model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    path, model = save_tiny(str(folder))
    return path, model, folder


CLASSES = ["golden retriever, goldie", "tabby cat", "red fox", "school bus"]


def test_single_template_logits_equal_open_clip_get_logits(tiny):
    path, model, _ = tiny
    clf = load_zero_shot_classifier(path, ARCH, CLASSES, ["a photo of a {}."])
    images = torch.rand(3, 3, 32, 32)
    ours = clf(images)
    # direct: open_clip's own normalisation constants, tokenizer and image-text logits
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    pre = (images - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    tok = open_clip.get_tokenizer(ARCH)
    texts = tok([f"a photo of a {prompt_name(c)}." for c in CLASSES])
    with torch.no_grad():
        direct, _ = model.get_logits(pre, texts)
    torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-5)
    assert clf.class_names == CLASSES and clf.num_classes == 4


def test_template_average_and_resize(tiny):
    path, model, _ = tiny
    temps = templates_for("simple imagenet (18)")
    clf = load_zero_shot_classifier(path, ARCH, CLASSES, temps)
    tok = open_clip.get_tokenizer(ARCH)
    with torch.no_grad():
        cols = []
        for c in CLASSES:
            e = model.encode_text(tok([t(prompt_name(c)) for t in temps]), normalize=True).mean(0)   # callables
            cols.append(e / e.norm())
        head = torch.stack(cols, 1)
    torch.testing.assert_close(clf.net.head, head, rtol=1e-5, atol=1e-6)
    # larger images: resized by the classifier's own preprocessing to the tower's 32 x 32
    assert clf(torch.rand(2, 3, 64, 80)).shape == (2, 4)
    assert clf.data_config.input_size == (3, 32, 32)


def test_templates_and_names_come_from_open_clip():
    from open_clip import zero_shot_metadata as meta

    assert templates_for("openai imagenet (80)") == tuple(meta.OPENAI_IMAGENET_TEMPLATES)
    assert len(templates_for("openai imagenet (80)")) == 80
    assert templates_for("simple imagenet (18)") == tuple(meta.SIMPLE_IMAGENET_TEMPLATES)
    assert templates_for("custom", "a {} here\n\nart of {}") == ("a {} here", "art of {}")
    with pytest.raises(GFCGInputError, match="custom_templates"):
        templates_for("custom", "no placeholder")
    names, prompts = class_names_for("imagenet-1k")
    assert len(names) == len(prompts) == 1000
    assert names[207].startswith("golden retriever") and prompts[207] == meta.IMAGENET_CLASSNAMES[207]
    names, prompts = class_names_for("list", "red fox, vulpes\n# comment\ntabby cat\n")
    assert names == ["red fox, vulpes", "tabby cat"] and prompts == ["red fox", "tabby cat"]
    with pytest.raises(GFCGInputError, match="class_list"):
        parse_class_list("one")
    with pytest.raises(GFCGInputError, match="twice"):
        parse_class_list("cat\nCat")


def test_cache_per_checkpoint_classes_and_templates(tiny, monkeypatch):
    """The text head is cached per (checkpoint, classes, templates); the classifier module never is:
    every load builds its own tower, which ComfyUI's model management then owns."""
    path, _, _ = tiny
    heads = []
    real = open_clip.build_zero_shot_classifier
    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", lambda *a, **k: heads.append(1) or real(*a, **k))
    clip_classifier._HEAD_CACHE.clear()
    a = load_zero_shot_classifier(path, ARCH, CLASSES, ["a photo of a {}."])
    b = load_zero_shot_classifier(path, ARCH, CLASSES, ["a photo of a {}."])
    assert b is not a and b.net is not a.net and len(heads) == 1       # a new tower, the cached head
    torch.testing.assert_close(b.net.head, a.net.head, rtol=0, atol=0)
    assert b.net.head.data_ptr() != a.net.head.data_ptr()                # no tensor shared between models
    load_zero_shot_classifier(path, ARCH, CLASSES[:3], ["a photo of a {}."])
    load_zero_shot_classifier(path, ARCH, CLASSES, ["art of a {}."])
    assert len(heads) == 3
    assert all(torch.is_tensor(t) or t is None for entry in clip_classifier._HEAD_CACHE.values() for t in entry)


def test_bad_files_and_architectures(tiny, tmp_path):
    path, _, _ = tiny
    with pytest.raises(GFCGInputError, match="architecture"):
        load_zero_shot_classifier(path, "no-such-arch", CLASSES, ["{}"])
    with pytest.raises(GFCGInputError, match="could not be loaded"):
        load_zero_shot_classifier(path, "RN50", CLASSES, ["{}"])          # wrong architecture for the weights
    sentinel = tmp_path / "SENTINEL"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(GFCGInputError, match="could not be loaded"):
        load_zero_shot_classifier(str(evil), ARCH, CLASSES, ["{}"])
    assert not sentinel.exists()
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"0")
    with pytest.raises(GFCGInputError, match="not one of"):
        load_zero_shot_classifier(str(bad), ARCH, CLASSES, ["{}"])


# --- preprocessing: the checkpoint family's, as open_clip's own eval transform gives it ----------------------------

# a checkpoint family: (a real architecture, its pretrained tag); open_clip's pretrained config for it
# carries the family's mean, std, interpolation and resize mode (nothing is downloaded)
FAMILIES = {"siglip": ("ViT-B-16-SigLIP", "webli"),            # 0.5 mean/std, squash
            "siglip2": ("ViT-B-16-SigLIP2", "webli"),
            "dfn": ("ViT-H-14-378-quickgelu", "dfn5b"),       # OpenAI mean/std, squash
            "clipa": ("ViT-L-14-CLIPA-336", "datacomp1b"),    # ImageNet mean/std, squash, bilinear
            "openai": ("ViT-B-32-quickgelu", "openai")}       # OpenAI mean/std, shortest side + centre crop
PP_KEYS = ("mean", "std", "interpolation", "resize_mode")
# non-square inputs: down (wide, tall), a long side whose scaled size rounds up (32 * 79 / 50 = 50.56:
# torchvision takes 50) with an odd crop margin, and up
SHAPES = [(48, 80), (50, 79), (83, 47), (20, 30)]


def family_cfg(family):
    cfg = open_clip.get_pretrained_cfg(*FAMILIES[family])
    return {k: cfg[k] for k in PP_KEYS}


def smooth_images(h, w, n=2):
    """Smooth images inside (0.1, 0.9), so no resize overshoots [0, 1] (the pack clamps it, as on
    open_clip's PIL path; a float tensor through torchvision is not clamped)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    imgs = [torch.stack([yy, xx, 0.5 + 0.5 * torch.sin(3.0 * (xx + i) + 2.0 * yy)], 0) for i in range(n)]
    return 0.1 + 0.8 * torch.stack(imgs)


def open_clip_transform(arch, cfg):
    """open_clip's own eval transform: create_model_and_transforms(arch, pretrained=None) with the
    family's preprocessing config."""
    _, _, pre = open_clip.create_model_and_transforms(
        arch, pretrained=None, image_mean=cfg["mean"], image_std=cfg["std"],
        image_interpolation=cfg["interpolation"], image_resize_mode=cfg["resize_mode"])
    return pre


def check_preprocessing(clf, pre, model, label):
    """The classifier's preprocessing equals open_clip's transform ``pre`` on non-square inputs, and its
    logits are the model's image-text logits on open_clip's preprocessed images."""
    texts = open_clip.get_tokenizer(ARCH)([f"a photo of a {prompt_name(c)}." for c in CLASSES])
    for h, w in SHAPES:
        images = smooth_images(h, w)
        ref = torch.stack([pre(im) for im in images])
        ours = clf.preprocess(images)
        assert ours.shape == ref.shape == (2, 3, 32, 32), (label, h, w)
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5, msg=lambda m: f"{label} {h}x{w}: {m}")
        with torch.no_grad():
            direct, _ = model.get_logits(ref, texts)
        torch.testing.assert_close(clf(images), direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_preprocessing_equals_open_clip_transforms_per_family(family, tiny):
    """The family's preprocessing as the pack resolves it for the real architecture and tag (open_clip's
    tables; the real models are too big for a test), run by the loader on the tiny model, against
    open_clip's own transform with the family's config."""
    path, model, _ = tiny
    cfg = clip_classifier.preprocess_config(*FAMILIES[family])
    assert cfg == family_cfg(family)
    clf = load_zero_shot_classifier(path, ARCH, CLASSES, ["a photo of a {}."], image_mean=cfg["mean"],
                                    image_std=cfg["std"], resize_mode=cfg["resize_mode"],
                                    interpolation=cfg["interpolation"])
    check_preprocessing(clf, open_clip_transform(ARCH, family_cfg(family)), model, family)


def test_default_preprocessing_equals_open_clip_transform(tiny):
    """No tag and no explicit values (an architecture without tags): open_clip's defaults, exactly
    (torchvision's size and crop rounding on non-square inputs)."""
    path, model, _ = tiny
    _, _, pre = open_clip.create_model_and_transforms(ARCH, pretrained=None)
    check_preprocessing(load_zero_shot_classifier(path, ARCH, CLASSES, ["a photo of a {}."]), pre, model, "default")


def test_preprocess_config_per_architecture_and_tag():
    pc = clip_classifier.preprocess_config
    for family, (arch, tag) in FAMILIES.items():
        assert pc(arch, tag) == family_cfg(family), family
        assert pc(arch) == family_cfg(family), family          # the one family all its tags share
    assert pc("ViT-B-16-SigLIP")["mean"] == (0.5, 0.5, 0.5) and pc("ViT-B-16-SigLIP")["resize_mode"] == "squash"
    assert pc("ViT-H-14-quickgelu", "dfn5b")["resize_mode"] == "squash"
    assert pc("ViT-H-14-quickgelu", "metaclip_fullcc")["resize_mode"] == "shortest"
    assert pc("ViT-B-16-plus") == family_cfg("openai")         # no tags: open_clip's defaults
    with pytest.raises(GFCGInputError, match=r"pretrained: ViT-H-14-quickgelu checkpoints differ.*dfn5b"):
        pc("ViT-H-14-quickgelu")                                 # MetaCLIP (shortest) and DFN-5B (squash)
    # explicit values override; they also settle tags that differ only in what they set
    assert pc("ViT-H-14-quickgelu", resize_mode="squash") == family_cfg("dfn")
    over = pc("ViT-B-32", "openai", image_mean="0.5", image_std="0.25, 0.5, 1", resize_mode="squash",
              interpolation="bilinear")
    assert over == {"mean": (0.5,) * 3, "std": (0.25, 0.5, 1.0), "interpolation": "bilinear", "resize_mode": "squash"}
    for kw, name in [(dict(pretrained="laion5b"), "pretrained"), (dict(image_mean="a, b, c"), "image_mean"),
                     (dict(image_mean="0.5, 0.5"), "image_mean"), (dict(image_std="0.5, 0, 0.5"), "image_std"),
                     (dict(resize_mode="longest"), "resize_mode"), (dict(interpolation="nearest"), "interpolation")]:
        with pytest.raises(GFCGInputError, match=f"^{name}: "):
            pc("ViT-B-32", **kw)
    with pytest.raises(GFCGInputError, match="^pretrained: .*it has none"):
        pc("ViT-B-16-plus", "openai")
    with pytest.raises(GFCGInputError, match="^architecture: "):
        pc("no-such-arch")


def test_loader_takes_the_tag_or_explicit_preprocessing(tiny):
    path, model, _ = tiny
    pre = open_clip_transform(ARCH, family_cfg("siglip"))
    clf = load_zero_shot_classifier(path, ARCH, CLASSES, ["{}"], image_mean="0.5", image_std="0.5",
                                    resize_mode="squash")
    images = smooth_images(50, 79)
    torch.testing.assert_close(clf.preprocess(images), torch.stack([pre(im) for im in images]), rtol=0, atol=2e-5)
    plain = load_zero_shot_classifier(path, ARCH, CLASSES, ["{}"])
    assert plain is not clf and plain.data_config.crop_mode == "center"
    assert plain.data_config.mean == tuple(open_clip.constants.OPENAI_DATASET_MEAN)
    with pytest.raises(GFCGInputError, match="^pretrained: 'webli' is not an open_clip pretrained tag"):
        load_zero_shot_classifier(path, ARCH, CLASSES, ["{}"], pretrained="webli")
