"""Testbed building blocks (no ComfyUI): the ShapePairs dataset, short training runs whose outputs
load through the pack's own loaders, and the headless Heun sampler driving the shared engine."""
import pytest
import torch

from comfyui_gfcg.edm2 import build_network, read_checkpoint
from comfyui_gfcg.edm2.network import EDM2, EDM2Config
from comfyui_gfcg.guiders.config import GFCGConfig
from comfyui_gfcg.testbed.dataset import CLASS_NAMES, NUM_CLASSES, PAIRS, RESOLUTION, make_split, render
from comfyui_gfcg.testbed.sampler import METHODS, sample
from comfyui_gfcg.testbed.train import (ClassifierRecipe, DiffusionRecipe, init_edm2, save_classifier, save_diffusion,
                                        train_classifier, train_diffusion)


def test_dataset_is_deterministic_balanced_and_in_range():
    a, ya = make_split(200, seed=7)
    b, yb = make_split(200, seed=7)
    c, _ = make_split(200, seed=8)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)
    assert a.shape == (200, 3, RESOLUTION, RESOLUTION) and a.min() >= -1 and a.max() <= 1
    assert torch.bincount(ya, minlength=NUM_CLASSES).tolist() == [20] * NUM_CLASSES
    assert len(CLASS_NAMES) == 10 and sorted(i for p in PAIRS for i in p) == list(range(10))


def test_classes_differ_only_in_shape():
    """Same nuisance draws, different class: the images differ, but only where the shape is."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for a, b in PAIRS:
        x = render(torch.full((4,), a), g1)
        y = render(torch.full((4,), b), g2)
        diff = (x - y).abs().amax(1)
        assert diff.amax() > 0.3                             # the pair is distinguishable
        assert (diff > 0.05).float().mean() < 0.5            # ... by a part of the image only (16 px: wide edges)


def test_short_training_runs_load_through_the_pack(tmp_path):
    r = DiffusionRecipe(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,),
                        channels_per_head=16, iterations=6, batch=8, dataset_size=200, lr_decay_from=2)
    ema, hist = train_diffusion(r)
    assert len(hist) == 6 and all(torch.isfinite(torch.tensor(hist)))
    path = tmp_path / "main.safetensors"
    save_diffusion(ema, r, str(path), hist)
    net = build_network(read_checkpoint(str(path)))
    x, y = torch.randn(2, 3, RESOLUTION, RESOLUTION), torch.eye(10)[:2]
    torch.testing.assert_close(net(x, 1.3, y), ema(x, 1.3, y), rtol=0, atol=5e-3)  # fp16 storage

    from comfyui_gfcg.classifiers import load_timm_classifier

    cr = ClassifierRecipe(architecture="test_resnet", iterations=3, batch=16, dataset_size=100)
    clf, _ = train_classifier(cr)
    cpath = tmp_path / "clf.safetensors"
    save_classifier(clf, cr, str(cpath))
    loaded = load_timm_classifier(str(cpath))
    assert loaded.class_names == list(CLASS_NAMES)
    imgs = torch.rand(2, 3, RESOLUTION, RESOLUTION)
    torch.testing.assert_close(loaded(imgs), clf((imgs - 0.5) / 0.5))


def _tiny_recipe(**kw):
    return DiffusionRecipe(**{**dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                                     channels_per_head=16, iterations=6, batch=8, dataset_size=200, lr_decay_from=2),
                              **kw})


def test_training_resumes_bit_for_bit(tmp_path):
    """Six iterations in one run equal three, saved, then three more from the checkpoint (network,
    optimiser, EMA, data RNG and loss history all carried over); the recorded time is summed."""
    full, h_full = train_diffusion(_tiny_recipe())
    ck = str(tmp_path / "main.pt")
    info = {}
    train_diffusion(_tiny_recipe(iterations=3), checkpoint=ck, info=info)
    assert info["done"] and info["iterations"] == 3
    first = info["seconds"]
    resumed, h_res = train_diffusion(_tiny_recipe(), checkpoint=ck, info=info)
    assert info["done"] and info["iterations"] == 6 and info["seconds"] >= first
    assert h_res == h_full
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path):
    ck = str(tmp_path / "main.pt")
    train_diffusion(_tiny_recipe(iterations=2), checkpoint=ck)
    with pytest.raises(ValueError, match="another recipe"):
        train_diffusion(_tiny_recipe(lr=0.02), checkpoint=ck)


def test_a_lost_checkpoint_is_rebuilt_from_the_committed_weights(tmp_path):
    """The warm start: a finished run's weights and record become a checkpoint at its last
    iteration (network and EMA = the fp16 weights, the recorded loss curve and seconds kept), the
    run goes on from there, and the note says so; a record of another recipe is refused."""
    from comfyui_gfcg.testbed.train import _thin, checkpoint_from_weights
    from dataclasses import asdict

    r = _tiny_recipe(iterations=20)
    ema, hist = train_diffusion(r)
    w = str(tmp_path / "main.safetensors")
    save_diffusion(ema, r, w, hist)
    record = {"recipe": asdict(r), "seconds": 12.5, "loss_every_10": [round(v, 5) for v in _thin(hist)]}
    ck = str(tmp_path / "main.pt")
    st = checkpoint_from_weights(_tiny_recipe(iterations=24), w, record, ck)
    assert st["iteration"] == 20 and st["seconds"] == 12.5 and "rebuilt at iteration 20" in st["warm_start"]
    assert _thin(st["history"].tolist()) == pytest.approx(record["loss_every_10"])
    saved = read_checkpoint(w).state_dict
    assert all(torch.equal(st["net"][k], saved[k].float()) for k in saved)
    info = {}
    _, h = train_diffusion(_tiny_recipe(iterations=24), checkpoint=ck, info=info)
    assert info["done"] and len(h) == 24 and info["warm_start"] == st["warm_start"]
    assert info["seconds"] >= 12.5
    with pytest.raises(ValueError, match="another recipe"):
        checkpoint_from_weights(_tiny_recipe(lr=0.5), w, record, str(tmp_path / "other.pt"))


def test_stop_after_saves_and_a_rerun_finishes(tmp_path):
    ck = str(tmp_path / "main.pt")
    info = {}
    train_diffusion(_tiny_recipe(), checkpoint=ck, stop_after=0.0, info=info)
    assert not info["done"] and info["iterations"] == 1     # stopped after its first iteration, saved
    _, hist = train_diffusion(_tiny_recipe(), checkpoint=ck, info=info)
    assert info["done"] and len(hist) == 6


def _tiny_net(seed):
    cfg = EDM2Config(img_resolution=32, img_channels=3, label_dim=10, model_channels=16, channel_mult=(1, 2),
                     num_blocks=1, attn_resolutions=(16,), channels_per_head=16)
    net = init_edm2(EDM2(cfg), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith("_gain"):
                p.fill_(0.5)  # nonzero output
    return net.prepare(torch.float32).requires_grad_(False).eval()


def test_headless_sampler_methods_and_costs():
    main, guide = _tiny_net(0), _tiny_net(1)
    w = torch.randn(10, 3)

    def clf(img):  # a fixed linear classifier on mean colour
        return img.mean(dim=(2, 3)) @ w.t()

    out = {}
    for m in METHODS:
        r = sample(main, clf, m, desired=3, n=2, seed=5, steps=4, guide=guide,
                   gfcg=GFCGConfig(desired_class=3, tau=1.0, alpha=2.0))
        assert r.images.shape == (2, 3, 32, 32) and torch.isfinite(r.images).all()
        out[m] = r
    assert out["none"].nfe == 7                       # Heun, 4 steps: 3 x 2 + final Euler
    assert out["cfg"].nfe == 14 and out["atg"].nfe == 14
    assert out["gfcg"].nfe > 7 and out["gfcg"].trace    # tau = 1: reference branches ran
    assert not out["none"].trace                     # no GFCG, no classifier
    # GFCG with tau = 0 is the unguided sampler, bit for bit
    r0 = sample(main, clf, "gfcg", desired=3, n=2, seed=5, steps=4, gfcg=GFCGConfig(desired_class=3, tau=0.0))
    assert torch.equal(r0.images, out["none"].images)
    with pytest.raises(ValueError, match="no guide model"):
        sample(main, clf, "atg", desired=3, n=1, steps=2)
    # per-row desired classes: one class for all rows is the same as that class repeated; the
    # decisions use each row's own class; an explicit schedule replaces `steps`
    g = GFCGConfig(desired_class=0, tau=1.0, alpha=2.0)
    a = sample(main, clf, "gfcg+cfg", desired=3, n=2, seed=5, steps=4, gfcg=g)
    b = sample(main, clf, "gfcg+cfg", desired=[3, 3], n=2, seed=5, steps=4, gfcg=g)
    assert torch.equal(a.images, b.images)
    c = sample(main, clf, "gfcg+cfg", desired=[3, 7], n=2, seed=5, steps=4, gfcg=g)
    # (row 0 is the same computation, but in forwards of other batch sizes: equal up to round-off)
    torch.testing.assert_close(c.images[0], a.images[0], rtol=0, atol=1e-4)
    assert (c.images[1] - a.images[1]).abs().max() > 1e-2
    assert all(r != 7 for r in c.trace[0].reference)     # never the row's own desired class
    from comfyui_gfcg.testbed.toy import edm_sigmas
    d = sample(main, clf, "none", desired=3, n=2, seed=5, sigmas=edm_sigmas(4))
    assert torch.equal(d.images, out["none"].images)
    with pytest.raises(ValueError, match="desired"):
        sample(main, clf, "none", desired=[3, 10], n=2, steps=2)


def test_label_noise_may_start_after_a_checkpoint_but_not_before(tmp_path):
    """A clean-label checkpoint continues into a recipe whose within-pair label noise starts at or
    after its iteration (the first part of both runs is the same), not into one that starts earlier."""
    from comfyui_gfcg.testbed.train import _continues
    from dataclasses import asdict

    clean = asdict(_tiny_recipe(iterations=3))
    clean.pop("label_noise")
    clean.pop("label_noise_from")                      # a checkpoint written before the field existed
    clean = {k: list(v) if isinstance(v, tuple) else v for k, v in clean.items()}
    assert _continues(clean, _tiny_recipe(label_noise=0.3, label_noise_from=3), 3)
    assert _continues(clean, _tiny_recipe(label_noise=0.3, label_noise_from=5), 3)
    assert not _continues(clean, _tiny_recipe(label_noise=0.3, label_noise_from=2), 3)
    assert not _continues(clean, _tiny_recipe(lr=0.02), 3)
    ck = str(tmp_path / "main.pt")
    train_diffusion(_tiny_recipe(iterations=3), checkpoint=ck)
    _, hist = train_diffusion(_tiny_recipe(label_noise=0.5, label_noise_from=3), checkpoint=ck)
    assert len(hist) == 6


def test_partner_and_pair_tables():
    from comfyui_gfcg.testbed.dataset import PAIR_OF, PARTNER

    for a, b in PAIRS:
        assert PARTNER[a] == b and PARTNER[b] == a and PAIR_OF[a] == PAIR_OF[b]
    assert len(set(PAIR_OF.tolist())) == len(PAIRS)


def test_a_shorter_recipe_of_the_same_run_is_its_snapshot(tmp_path, monkeypatch):
    """The guide recipe = the main recipe stopped earlier: train_testbed takes the main run's EMA
    snapshot at that length (no training of its own) and records whose snapshot it is."""
    import json

    from comfyui_gfcg.testbed import train as T

    long, short = _tiny_recipe(iterations=4), _tiny_recipe(iterations=2)
    monkeypatch.setitem(T.RECIPES, "main", long)
    monkeypatch.setitem(T.RECIPES, "guide", short)
    ck = tmp_path / "ck"
    ck.mkdir()
    train_diffusion(long, checkpoint=str(ck / "main.pt"), snapshot_every=2)
    rec = T.train_testbed(["guide"], out_dir=str(tmp_path / "w"), log=lambda *_: None, checkpoint_dir=str(ck))
    assert rec["guide"]["snapshot_of"] == "main" and len(rec["guide"]["loss_every_10"]) == 1
    saved = build_network(read_checkpoint(str(tmp_path / "w" / "edm2" / "gfcg_testbed_guide.safetensors")))
    snap = build_network(read_checkpoint(str(ck / "main.pt.ema2.safetensors")))
    x, y = torch.randn(2, 3, RESOLUTION, RESOLUTION), torch.eye(10)[:2]
    torch.testing.assert_close(saved(x, 1.3, y), snap(x, 1.3, y))
    assert json.loads(read_checkpoint(str(tmp_path / "w" / "edm2" / "gfcg_testbed_guide.safetensors")).source
                      .split("testbed:", 1)[1])["recipe"]["iterations"] == 2
