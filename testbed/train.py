"""Training the testbed's models on ShapePairs (CPU-sized; every run is seeded and logged).

Diffusion models use the pack's EDM2 network in pixel space (16x16x3) with the EDM2 recipe in
small: log-normal sigma (P_mean, P_std), EDM loss weighting with the learned uncertainty u(sigma)
(the logvar head), forced weight normalisation after every step, Adam with inverse-square-root
decay, and an EMA of the weights. Label dropout gives the main model an unconditional (zero-label)
mode for CFG. Classifiers are timm architectures trained with cross-entropy on their own,
disjoint data seeds, saved in the format the pack's classifier loader reads.

Diffusion training is resumable: every ``save_every`` iterations the whole state (network,
optimiser, EMA, the data generator's RNG, the loss history, the wall time so far) goes to a
checkpoint file outside git, and a later run with the same recipe continues from it bit for bit,
so a long CPU run can be split over sessions. EMA snapshots at ``snapshot_every`` let the recipe's
iteration count be chosen from a measured curve.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..edm2.checkpoint import EDM2Checkpoint, build_network, read_checkpoint, save_safetensors
from ..edm2.network import EDM2, EDM2Config, MPConv, MPFourier, normalize
from .dataset import CLASS_NAMES, NUM_CLASSES, PARTNER, RESOLUTION, SEEDS, make_split, to_unit
from .files import FILES, WEIGHTS_DIR


@dataclass
class DiffusionRecipe:
    model_channels: int = 32
    channel_mult: tuple = (1, 2, 2)
    num_blocks: int = 2
    attn_resolutions: tuple = (4,)
    channels_per_head: int = 32
    iterations: int = 1200
    batch: int = 64
    lr: float = 0.01
    lr_decay_from: int = 400           # lr = lr / sqrt(max(t / decay_from, 1))
    ema: float = 0.999
    p_mean: float = -0.8
    p_std: float = 1.6
    label_dropout: float = 0.1
    dataset_size: int = 50000
    seed: int = 0
    resolution: int = RESOLUTION
    precision: str = "bf16"            # "bf16": the forward under CPU/GPU autocast (EDM2 trains mixed-precision)
    # within-pair label noise: from iteration `label_noise_from` on, each training image carries its
    # pair partner's label with probability `label_noise` (fine-grained label confusion, as between
    # neighbouring ImageNet classes): the model then draws the right pair but often the wrong member
    label_noise: float = 0.0
    label_noise_from: int = 0

    def config(self) -> EDM2Config:
        return EDM2Config(img_resolution=self.resolution, img_channels=3, label_dim=NUM_CLASSES, model_channels=self.model_channels,
                          channel_mult=self.channel_mult, num_blocks=self.num_blocks,
                          attn_resolutions=self.attn_resolutions, channels_per_head=self.channels_per_head)


def init_edm2(net: EDM2, generator: torch.Generator) -> EDM2:
    """EDM2's initialisation: unit-RMS random weights, zero gains, random Fourier features."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, MPConv):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator))
            elif isinstance(m, MPFourier):
                m.freqs.copy_(2 * math.pi * torch.randn(m.freqs.shape, generator=generator))
                m.phases.copy_(2 * math.pi * torch.rand(m.phases.shape, generator=generator))
        for name, p in net.named_parameters():
            if name.endswith("_gain"):
                p.zero_()
    net.requires_grad_(True)
    for m in net.modules():
        if isinstance(m, MPFourier):
            m.requires_grad_(False)
    return net


@torch.no_grad()
def force_normalize(net: EDM2) -> None:
    """Forced weight normalisation: every MPConv weight row back to unit RMS (EDM2, training only)."""
    for m in net.modules():
        if isinstance(m, MPConv):
            m.weight.copy_(normalize(m.weight))


def edm2_loss(net: EDM2, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
              p_mean: float, p_std: float) -> torch.Tensor:
    """EDM2 loss: E[ lambda(s)/e^u(s) ||D(x + s n; s) - x||^2 + u(s) ], ln s ~ N(p_mean, p_std^2),
    lambda(s) = (s^2 + sd^2) / (s sd)^2."""
    n = x.shape[0]
    sigma = (torch.randn(n, generator=generator) * p_std + p_mean).exp()
    noise = torch.randn(x.shape, generator=generator)
    d = net(x + sigma.view(-1, 1, 1, 1) * noise, sigma, labels)
    sd = net.sigma_data
    lam = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    logvar = net.logvar_linear(net.logvar_fourier(sigma.log() / 4)).view(-1)
    per = ((d - x) ** 2).mean(dim=(1, 2, 3))
    return (lam / logvar.exp() * per + logvar).mean()


def _diffusion_state(net, ema, opt, g, it, history, seconds, recipe, warm_start: str = "") -> dict:
    st = {"recipe": json.dumps(asdict(recipe)), "iteration": it, "seconds": seconds,
          "history": torch.tensor(history, dtype=torch.float32), "rng": g.get_state(),
          "net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}
    if warm_start:   # the run went on from rebuilt state here (checkpoint_from_weights)
        st["warm_start"] = warm_start
    return st


def _save_atomic(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _continues(saved: dict, recipe: DiffusionRecipe, done: int) -> bool:
    """Whether a checkpoint written with recipe ``saved`` after ``done`` iterations is the start of a
    run of ``recipe``: the same recipe up to its length (the lr schedule does not depend on it) and to
    settings that act only from a later iteration on (label noise starting at or after ``done``);
    fields the saved recipe predates take their defaults."""
    new = json.loads(json.dumps(asdict(recipe)))
    old = dict(saved)
    old.setdefault("label_noise", 0.0)
    old.setdefault("label_noise_from", 0)
    later = ("label_noise", "label_noise_from")
    if {k: v for k, v in old.items() if k not in ("iterations", *later)} != \
            {k: v for k, v in new.items() if k not in ("iterations", *later)}:
        return False
    same_noise = (old["label_noise"], old["label_noise_from"]) == (new["label_noise"], new["label_noise_from"])
    no_noise_yet = (old["label_noise"] == 0 or old["label_noise_from"] >= done) and \
        (new["label_noise"] == 0 or new["label_noise_from"] >= done)
    return same_noise or no_noise_yet


def checkpoint_from_weights(recipe: DiffusionRecipe, weights: str, record: dict, path: str) -> dict:
    """Rebuild a lost training checkpoint from the committed weights of a finished run.

    The committed file holds the run's EMA network (fp16); the checkpoint that continued it bit
    for bit did not survive (it is kept outside git). The rebuilt state starts the network *and* its
    EMA from those weights, Adam's moments from zero, and the data generator from
    ``seed + iteration``; the loss history is the record's 10-iteration means, each repeated 10
    times (its recorded curve is unchanged), and the wall time is the record's. Resuming from it is
    a warm start, not the same run: ``train_testbed`` records that in the run's ``runs_note``."""
    if json.loads(json.dumps({**asdict(recipe), "iterations": 0})) != json.loads(json.dumps({**record["recipe"], "iterations": 0})):
        raise ValueError(f"{weights!r} was trained with another recipe: {record['recipe']}")
    done = int(record["recipe"]["iterations"])
    ck = read_checkpoint(weights)
    net = EDM2(recipe.config())
    net.load_state_dict({k: v.float() for k, v in ck.state_dict.items()}, strict=True)
    net.requires_grad_(True)     # trainable as in init_edm2: all but the Fourier features
    for m in net.modules():
        if isinstance(m, MPFourier):
            m.requires_grad_(False)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=recipe.lr, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(recipe.seed + done)
    history = [v for v in record["loss_every_10"] for _ in range(10)][:done]
    saved = dataclasses.replace(recipe, iterations=done)
    note = f"rebuilt at iteration {done} from {os.path.basename(weights)}"
    state = _diffusion_state(net, ema, opt, g, done, history, float(record["seconds"]), saved, note)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _save_atomic(state, path)
    return state


def train_diffusion(recipe: DiffusionRecipe, log: Optional[Callable[[dict], None]] = None,
                    checkpoint: Optional[str] = None, save_every: int = 200, snapshot_every: int = 0,
                    stop_after: Optional[float] = None, info: Optional[dict] = None):
    """Train one EDM2 pixel model; returns (EMA network, loss history).

    ``checkpoint``: a file for the training state; when it exists (same recipe) training resumes
    from it. ``stop_after``: seconds after which this run saves and returns early (``info["done"]``
    False; run again to continue). ``snapshot_every``: also save the EMA network every so many
    iterations next to the checkpoint (``<checkpoint>.ema<iteration>.safetensors``).
    ``info`` (a dict) receives iterations, total seconds across resumptions and ``done``."""
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    images, labels = make_split(recipe.dataset_size, SEEDS["diffusion"], size=recipe.resolution)
    net = init_edm2(EDM2(recipe.config()), g)
    force_normalize(net)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=recipe.lr, betas=(0.9, 0.99))
    history, start, before, warm = [], 0, 0.0, ""
    if checkpoint and os.path.exists(checkpoint):
        st = torch.load(checkpoint, map_location="cpu", weights_only=True)
        start = int(st["iteration"])
        if not _continues(json.loads(st["recipe"]), recipe, start):
            raise ValueError(f"checkpoint {checkpoint!r} was written for another recipe: {st['recipe']}")
        net.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        g.set_state(st["rng"])
        before, history = float(st["seconds"]), st["history"].tolist()
        warm = str(st.get("warm_start", ""))
        if start > recipe.iterations:
            raise ValueError(f"checkpoint {checkpoint!r} is at iteration {start}, past the recipe's "
                             f"{recipe.iterations}; use its EMA snapshot of that iteration instead")
        if log is not None:
            log({"resumed_at": start, "seconds_before": before})
    t0 = time.time()
    it = start
    for it in range(start, recipe.iterations):
        idx = torch.randint(0, images.shape[0], (recipe.batch,), generator=g)
        cls = labels[idx]
        if recipe.label_noise > 0 and it >= recipe.label_noise_from:
            cls = torch.where(torch.rand(recipe.batch, generator=g) < recipe.label_noise, PARTNER[cls], cls)
        y = F.one_hot(cls, NUM_CLASSES).float()
        drop = torch.rand(recipe.batch, generator=g) < recipe.label_dropout
        y[drop] = 0.0
        x = images[idx]
        if torch.rand((), generator=g) < 0.5:  # horizontal flips keep every class (all are mirror-symmetric)
            x = x.flip(-1)
        lr = recipe.lr / math.sqrt(max(it / recipe.lr_decay_from, 1.0))
        for grp in opt.param_groups:
            grp["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.precision == "bf16"):
            loss = edm2_loss(net, x, y, g, recipe.p_mean, recipe.p_std).float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        force_normalize(net)
        beta = min(recipe.ema, (1 + it) / (10 + it))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - beta)
        history.append(float(loss.detach()))
        done_its = it + 1
        if log is not None and (it % 50 == 0 or done_its == recipe.iterations):
            log({"iter": it, "loss": sum(history[-50:]) / len(history[-50:]), "lr": lr,
                 "seconds": before + time.time() - t0})
        if snapshot_every and checkpoint and done_its % snapshot_every == 0:
            save_diffusion(ema, recipe, f"{checkpoint}.ema{done_its}.safetensors", history,
                           seconds=before + time.time() - t0)
        out_of_time = stop_after is not None and time.time() - t0 > stop_after
        if checkpoint and (done_its % save_every == 0 or out_of_time) and done_its < recipe.iterations:
            _save_atomic(_diffusion_state(net, ema, opt, g, done_its, history, before + time.time() - t0, recipe, warm),
                         checkpoint)
        if out_of_time and done_its < recipe.iterations:
            if info is not None:
                info.update(iterations=done_its, seconds=before + time.time() - t0, done=False, warm_start=warm)
            return ema, history
    total = before + time.time() - t0
    if checkpoint:
        _save_atomic(_diffusion_state(net, ema, opt, g, recipe.iterations, history, total, recipe, warm), checkpoint)
    if info is not None:
        info.update(iterations=recipe.iterations, seconds=total, done=True, warm_start=warm)
    return ema, history


def save_diffusion(net: EDM2, recipe: DiffusionRecipe, path: str, history=None, seconds=None) -> None:
    """Raw (unfolded) fp16 weights + config metadata: loadable by the EDM2 loader node and CLI."""
    sd = {k: v.detach().to(torch.float16) for k, v in net.state_dict().items()}
    meta = {"recipe": asdict(recipe), "final_loss": history[-1] if history else None}
    if seconds is not None:
        meta["seconds"] = round(float(seconds), 1)
    meta_src = json.dumps(meta)
    save_safetensors(EDM2Checkpoint(net.config, sd, {"kind": "standard_rgb"}, f"testbed:{meta_src}"), path)


# ----------------------------------------------------------------------------------------------
# Classifiers


@dataclass
class ClassifierRecipe:
    architecture: str = "resnet10t"
    data_seed: int = SEEDS["guidance_classifier"]
    iterations: int = 600
    batch: int = 128
    lr: float = 2e-3
    dataset_size: int = 20000
    resolution: int = RESOLUTION
    noise_aug: float = 0.0     # std of added Gaussian noise (in [-1, 1] units), to see rough x0 estimates
    seed: int = 0
    kwargs: dict = field(default_factory=dict)


def train_classifier(recipe: ClassifierRecipe, log: Optional[Callable[[dict], None]] = None):
    """Cross-entropy training of a timm model on images in [0, 1] (its own data seed)."""
    import timm

    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    images, labels = make_split(recipe.dataset_size, recipe.data_seed, size=recipe.resolution)
    net = timm.create_model(recipe.architecture, pretrained=False, num_classes=NUM_CLASSES, **recipe.kwargs)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.iterations)
    history = []
    t0 = time.time()
    net.train()
    for it in range(recipe.iterations):
        idx = torch.randint(0, images.shape[0], (recipe.batch,), generator=g)
        x = images[idx]
        if recipe.noise_aug > 0:
            x = x + recipe.noise_aug * torch.rand(recipe.batch, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
        logits = net(_normalize(to_unit(x)))
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
        if log is not None and (it % 50 == 0 or it == recipe.iterations - 1):
            log({"iter": it, "loss": sum(history[-50:]) / len(history[-50:]), "seconds": time.time() - t0})
    return net.eval(), history


MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
DATA_CONFIG = {"input_size": [3, RESOLUTION, RESOLUTION], "crop_pct": 1.0, "interpolation": "bilinear", "mean": list(MEAN),
               "std": list(STD)}


def _normalize(x01: torch.Tensor) -> torch.Tensor:
    return (x01 - 0.5) / 0.5


def save_classifier(net, recipe: ClassifierRecipe, path: str) -> None:
    from ..classifiers.timm_classifier import save_timm_classifier

    save_timm_classifier(path, net.to(torch.float32), recipe.architecture, class_names=list(CLASS_NAMES),
                         data_config=DATA_CONFIG)


@torch.no_grad()
def accuracy(classifier: Callable[[torch.Tensor], torch.Tensor], n: int = 2000, seed: int = SEEDS["classifier_val"]) -> float:
    """Top-1 accuracy on fresh images ([0, 1] input) from a seed no training run uses."""
    x, y = make_split(n, seed)
    return float((classifier(to_unit(x)).argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------------------------
# The committed testbed models: one recipe each, trained by ``python -m comfyui_gfcg train``.

MAIN = DiffusionRecipe(iterations=16000, lr_decay_from=1000, label_noise=0.3, label_noise_from=2000)

RECIPES = {
    # class-conditional main model with label dropout (its zero label is the CFG negative) and
    # within-pair label noise from iteration 2000 on (docs/testbed.md: the paper's regime)
    "main": MAIN,
    # the autoguidance guide: the same network trained half as long (the main run's EMA at 4000,
    # chosen among 4000 / 5000 / 6000 on the sweep's seeds: the best FD at equal class precision)
    "guide": dataclasses.replace(MAIN, iterations=4000),
    # guidance classifier (the one GFCG reads) and evaluation classifier (never guides), own data seeds
    "guidance_classifier": ClassifierRecipe(architecture="regnetx_002", data_seed=SEEDS["guidance_classifier"]),
    "eval_classifier": ClassifierRecipe(architecture="test_resnet", data_seed=SEEDS["eval_classifier"], lr=5e-3, seed=1),
}


def _thin(history, every: int = 10):
    """Mean loss over consecutive blocks of ``every`` iterations (the recorded loss curve)."""
    return [sum(history[i:i + every]) / len(history[i:i + every]) for i in range(0, len(history), every)]


def _snapshot_of_longer_run(name: str, recipe, checkpoint_dir: str):
    """(run, snapshot path, seconds, loss history) where another testbed recipe is this one run
    longer, or this run's own checkpoint went past this recipe's length, and the checkpoint left an
    EMA snapshot at this recipe's length; else None."""
    if not isinstance(recipe, DiffusionRecipe):
        return None
    own = os.path.join(checkpoint_dir, f"{name}.pt")
    candidates = [other for other, r in RECIPES.items() if other != name and isinstance(r, DiffusionRecipe)
                  and r.iterations > recipe.iterations
                  and {**asdict(r), "iterations": 0} == {**asdict(recipe), "iterations": 0}]
    if os.path.exists(own) and int(torch.load(own, map_location="cpu", weights_only=True)["iteration"]) > recipe.iterations:
        candidates.insert(0, name)
    for other in candidates:
        snap = os.path.join(checkpoint_dir, f"{other}.pt.ema{recipe.iterations}.safetensors")
        ck = os.path.join(checkpoint_dir, f"{other}.pt")
        if os.path.exists(snap) and os.path.exists(ck):
            from safetensors import safe_open

            with safe_open(snap, "pt") as f:
                meta = f.metadata() or {}
            seconds = None
            for v in meta.values():   # the snapshot's own record (save_diffusion's metadata)
                if isinstance(v, str) and '"seconds"' in v:
                    try:
                        seconds = json.loads(v.split("testbed:", 1)[-1]).get("seconds")
                    except ValueError:
                        pass
            hist = torch.load(ck, map_location="cpu", weights_only=True)["history"].tolist()[:recipe.iterations]
            return other, snap, seconds, hist
    return None


CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")  # git-ignored


def train_testbed(names, out_dir: str = WEIGHTS_DIR, log=print, checkpoint_dir: str = CHECKPOINT_DIR,
                  stop_after: Optional[float] = None, snapshot_every: int = 1000, warm_start: bool = False) -> dict:
    """Train the named testbed models, save their weights and record recipe, seeds, wall time,
    loss curve and (classifiers) held-out accuracy in ``training.json``.

    Diffusion models resume from ``checkpoint_dir/<name>.pt`` and stop after ``stop_after``
    seconds (saved; run the same command again to continue); their weights and record are
    written once the recipe's iterations are done. The recorded seconds are summed over runs."""
    os.makedirs(out_dir, exist_ok=True)
    record_path = os.path.join(out_dir, "training.json")
    record = json.load(open(record_path)) if os.path.exists(record_path) else {}
    for name in names:
        recipe = RECIPES[name]
        path = os.path.join(out_dir, FILES[name])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        log(f"[{name}] {recipe}")

        def progress(d, name=name):
            log(f"[{name}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()))

        t0 = time.time()
        entry = {"recipe": asdict(recipe), "torch": torch.__version__}
        snap = _snapshot_of_longer_run(name, recipe, checkpoint_dir)
        if snap is not None:   # the same run, stopped earlier: its EMA snapshot, no training of its own
            other, snap_path, seconds, history = snap
            ck = read_checkpoint(snap_path)     # the raw weights as they are, under this recipe's record
            meta = {"recipe": asdict(recipe), "final_loss": history[-1] if history else None, "seconds": seconds,
                    "snapshot_of": other}
            save_safetensors(EDM2Checkpoint(ck.config, ck.state_dict, ck.encoder, f"testbed:{json.dumps(meta)}"), path)
            net = build_network(ck)
            entry.update(parameters=sum(p.numel() for p in net.parameters()), snapshot_of=other)
            t0 = time.time() - (seconds or 0.0)
            if other == name:   # this run went on past the recipe: its own snapshot at the recipe's length
                del entry["snapshot_of"]
                st = torch.load(os.path.join(checkpoint_dir, f"{name}.pt"), map_location="cpu", weights_only=True)
                old_note = record.get(name, {}).get("runs_note")
                if st.get("warm_start") and old_note and "Then rebuilt" not in old_note:
                    old_note += (f" Then {st['warm_start']} (the checkpoint was lost with its machine): network "
                                 "and EMA from those fp16 weights, Adam's moments from zero, data RNG reseeded; "
                                 "iterations and seconds go on from the record.")
                if old_note:
                    entry["runs_note"] = old_note
                entry["stopped_note"] = (f"the run's EMA snapshot at {recipe.iterations}; the run itself went on "
                                         f"to {int(st['iteration'])} (training_curve.md)")
        elif isinstance(recipe, DiffusionRecipe):
            os.makedirs(checkpoint_dir, exist_ok=True)
            ck_path = os.path.join(checkpoint_dir, f"{name}.pt")
            if warm_start and not os.path.exists(ck_path) and name in record and os.path.exists(path):
                checkpoint_from_weights(recipe, path, record[name], ck_path)
                log(f"[{name}] no checkpoint: rebuilt {ck_path} from {path} at iteration "
                    f"{record[name]['recipe']['iterations']} (a warm start: Adam's moments from zero)")
            old_note = record.get(name, {}).get("runs_note")
            info = {}
            net, history = train_diffusion(recipe, progress, checkpoint=os.path.join(checkpoint_dir, f"{name}.pt"),
                                           snapshot_every=snapshot_every, stop_after=stop_after, info=info)
            if not info["done"]:
                log(f"[{name}] stopped at iteration {info['iterations']} of {recipe.iterations} after "
                    f"{info['seconds']:.0f} s in all; run the same command again to continue")
                continue
            save_diffusion(net, recipe, path, history)
            entry["parameters"] = sum(p.numel() for p in net.parameters())
            t0 = time.time() - info["seconds"]  # the recorded wall time: all runs together
            if old_note:
                entry["runs_note"] = old_note
            if info.get("warm_start") and (not old_note or info["warm_start"] not in old_note):
                entry["runs_note"] = " ".join(x for x in (old_note, f"Then {info['warm_start']} (the checkpoint "
                                              "was lost with its machine): network and EMA from those fp16 "
                                              "weights, Adam's moments from zero, data RNG reseeded; "
                                              "iterations and seconds go on from the record.") if x)
        else:
            net, history = train_classifier(recipe, progress)
            save_classifier(net, recipe, path)
            entry["parameters"] = sum(p.numel() for p in net.parameters())
            entry["val_accuracy"] = accuracy(lambda x: net(_normalize(x)))
            log(f"[{name}] held-out accuracy {entry['val_accuracy']:.4f}")
        entry.update(seconds=round(time.time() - t0, 1), file=FILES[name], bytes=os.path.getsize(path),
                     loss_every_10=[round(v, 5) for v in _thin(history)])
        if snap is not None:   # the wall time of the run's first iterations (None: not recorded)
            entry["seconds"] = None if snap[2] is None else round(float(snap[2]), 1)
        record[name] = entry
        with open(record_path, "w") as f:
            json.dump(record, f, indent=1)
        log(f"[{name}] saved {path} ({entry['bytes'] / 1e6:.2f} MB) in {entry['seconds'] or 0:.0f} s")
    return record


def plot_loss_curves(record: dict, path: str) -> None:
    """One panel per model: its recorded training loss (means over 10 iterations)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in FILES if n in record]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, n in zip(axes[0], names):
        curve = record[n]["loss_every_10"]
        ax.plot([10 * i for i in range(len(curve))], curve)
        secs = record[n].get("seconds")
        ax.set_title(f"{n} ({secs:.0f} s)" if secs is not None else n, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
