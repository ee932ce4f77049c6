"""open_clip zero-shot classifiers from local files (framework-free), on a tiny random-weight model."""
import json
import os
import pickle

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

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


def test_cache_per_checkpoint_classes_and_templates(tiny):
    path, _, _ = tiny
    a = load_zero_shot_classifier(path, ARCH, CLASSES, ["a photo of a {}."])
    assert load_zero_shot_classifier(path, ARCH, CLASSES, ["a photo of a {}."]) is a
    assert load_zero_shot_classifier(path, ARCH, CLASSES[:3], ["a photo of a {}."]) is not a
    assert load_zero_shot_classifier(path, ARCH, CLASSES, ["art of a {}."]) is not a


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
