"""The zero-shot (open_clip) loader and the ImageNet class picker through ComfyUI's node registry."""
import pytest
import torch

from conftest import node, sample

pytestmark = pytest.mark.comfy
open_clip = pytest.importorskip("open_clip")

TEN = [f"shape {i}, s{i}" for i in range(10)]


@pytest.fixture(scope="module")
def clip_env(env, tmp_path_factory):
    import folder_paths

    from test_clip_classifier import ARCH, save_tiny

    folder = tmp_path_factory.mktemp("gfcg_clip")
    path, model = save_tiny(str(folder))
    lists = tmp_path_factory.mktemp("gfcg_class_lists")
    (lists / "ten.txt").write_text("# ten shapes\n" + "\n".join(TEN) + "\n")
    folder_paths.add_model_folder_path("gfcg_clip", str(folder))
    folder_paths.add_model_folder_path("gfcg_class_lists", str(lists))
    return dict(env=env, arch=ARCH, model=model, name=path.split("/")[-1])


def test_loader_node_logits_match_open_clip(clip_env):
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    reg = clip_env["env"]["reg"]
    cls = reg["GFCGLoadZeroShotClassifier"]
    kw = dict(clip_name=clip_env["name"], architecture=clip_env["arch"], class_source="list",
              class_list="\n".join(TEN), templates="a photo of a {}.")
    assert cls.validate_inputs(**kw) is True
    with torch.inference_mode():   # as ComfyUI executes nodes
        clf = cls.execute(**kw).result[0]
    images = torch.rand(2, 3, 32, 32)
    ours = clf.classifier(images)
    pre = (images - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    texts = open_clip.get_tokenizer(clip_env["arch"])([f"a photo of a shape {i}." for i in range(10)])
    with torch.no_grad():
        direct, _ = clip_env["model"].get_logits(pre, texts)
    torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-5)
    assert clf.class_names == TEN
    # the same list from a text file: the same logits (the cached head), a classifier of its own
    same = cls.execute(**dict(kw, class_source="file", class_file="ten.txt", class_list="")).result[0]
    assert same.classifier is not clf.classifier
    torch.testing.assert_close(same.classifier(images), ours, rtol=0, atol=0)
    assert "class_file" in cls.validate_inputs(**dict(kw, class_source="file", class_file="(none)"))
    assert "custom_templates" in cls.validate_inputs(**dict(kw, templates="custom", custom_templates="no slot"))
    assert "clip_name" in cls.validate_inputs(**dict(kw, clip_name="missing.safetensors"))


def test_zero_shot_classifier_drives_gfcg_and_gradient_guidance(clip_env):
    env = clip_env["env"]
    clf = env["reg"]["GFCGLoadZeroShotClassifier"].execute(
        clip_name=clip_env["name"], architecture=clip_env["arch"], class_source="list", class_list="\n".join(TEN),
        templates="simple imagenet (18)").result[0]
    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos = cm.label_cond(3)
    g = node(env, "GFCGGuider", model=m, positive=pos, classifier=clf, desired_class="s3", tau=1.0, alpha=2.0,
             beta=1.0, window_start=0.0, window_end=1.0, period=1, reference="deterministic")
    out = sample(g, steps=3)
    assert torch.isfinite(out).all() and len(g.engine.trace) == 3
    c = node(env, "GFCGClassifierGuidance", model=m, positive=pos, classifier=clf, desired_class="shape 3",
             scale=0.05, gamma=0.3, softplus_beta=5.0, tau1=1.0, tau2=0.0, classifier_input="denoised", cfg=1.0)
    assert torch.isfinite(sample(c, steps=3)).all()


def test_imagenet_class_picker(env):
    cls = env["reg"]["GFCGImageNetClass"]
    opts = cls.GET_SCHEMA().inputs[0].options
    assert len(opts) == 1000 and opts[207].startswith("207: golden retriever")
    assert cls.execute(opts[207]).result == ("207", 207)
    assert cls.execute(opts[0]).result == ("0", 0)


def test_loader_node_preprocessing_inputs(clip_env):
    """The family's preprocessing through the node: explicit values run as open_clip's own transform;
    the tag and the values are checked before the run, each error naming its input."""
    from test_clip_classifier import family_cfg, open_clip_transform, smooth_images

    cls = clip_env["env"]["reg"]["GFCGLoadZeroShotClassifier"]
    inputs = {i.id: i for i in cls.GET_SCHEMA().inputs}
    for name in ("pretrained", "image_mean", "image_std", "resize_mode", "interpolation"):
        assert inputs[name].optional and inputs[name].tooltip, name
    kw = dict(clip_name=clip_env["name"], architecture=clip_env["arch"], class_source="list",
              class_list="\n".join(TEN), templates="a photo of a {}.", pretrained="", image_mean="0.5",
              image_std="0.5, 0.5, 0.5", resize_mode="squash", interpolation="auto")
    assert cls.validate_inputs(**kw) is True
    with torch.inference_mode():
        clf = cls.execute(**kw).result[0]
    pre = open_clip_transform(clip_env["arch"], family_cfg("siglip"))
    images = smooth_images(50, 79)
    torch.testing.assert_close(clf.classifier.preprocess(images), torch.stack([pre(im) for im in images]),
                               rtol=0, atol=2e-5)
    # checked before the run (no file is read): tags per architecture, values per input
    assert cls.validate_inputs(**dict(kw, architecture="ViT-B-16-SigLIP", pretrained="webli")) is True
    assert cls.validate_inputs(**dict(kw, architecture="ViT-H-14-quickgelu", image_mean="", image_std="",
                                      resize_mode="auto")).startswith("pretrained: ViT-H-14-quickgelu checkpoints")
    assert cls.validate_inputs(**dict(kw, pretrained="webli")).startswith("pretrained: 'webli' is not")
    assert cls.validate_inputs(**dict(kw, image_mean="0.5 0.5")).startswith("image_mean:")
    assert cls.validate_inputs(**dict(kw, image_std="-1")).startswith("image_std:")
    with pytest.raises(ValueError, match="^pretrained: "):
        cls.execute(**dict(kw, pretrained="webli"))
