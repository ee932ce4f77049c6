"""``python -m comfyui_gfcg bench --perf --latent``: what GFCG + autoguidance costs on a latent
model, through ComfyUI's sampler and the pack's real guider, decoder and classifier glue.

Setting (the issue's): EDM2-S img512 guided by EDM2-XS (the pack's EDM2 network, random weights,
EDM2's own initialisation), the SD VAE and TAESD architectures with random weights (ComfyUI's
``VAE`` and ``comfy.taesd``), a timm ResNet-50 (random weights), batch 4, ComfyUI's Heun on the
first ``steps`` steps of the shipped workflow's 32-step karras schedule (the classifier schedule
keeps its density over those steps: period 2 classifies steps 0, 2, ...). Rows, interleaved,
median of ``reps`` runs, each against ATG measured in the same run:

- ATG: the GFCG Combiner with tau 0 (the engine then never classifies: plain autoguidance);
- GFCG+ATG as the EDM2 workflow ships it (``SHIPPED``), with a TAESD file present (decode = auto
  takes it) and without one (auto falls back to the full VAE);
- GFCG+ATG additive as the workflow shipped it before (every step, the VAE at half resolution).

With random weights the classifier is never confident (p ~ 1/1000 < tau): every sample is guided
on every classifier step, the worst case for GFCG's cost (nothing settles). Needs a ComfyUI tree.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from typing import Dict, List, Optional

import torch

from .bench import SHIPPED_ATG

# GFCG node settings of workflows/api/edm2_img512_s_gfcg_autoguidance.json, now (the testbed's
# choice, bench.SHIPPED_ATG, with the decode defaults) and before (tests/test_workflows_offline.py
# holds the workflows to SHIPPED)
SHIPPED = dict(tau=0.5, alpha=4.0, beta=1.0, window_start=0.0, window_end=1.0, period=1, settle_after=0,
               decode="auto", decode_resolution=0.0)
SHIPPED.update(SHIPPED_ATG["gfcg"], mode=SHIPPED_ATG["mode"])
BEFORE = dict(tau=0.5, alpha=4.0, beta=1.0, window_start=0.0, window_end=1.0, period=1, settle_after=0,
              mode="additive", decode="vae", decode_resolution=0.5)
ATG_SCALE = 2.1    # the workflow's autoguidance weight (EDM2-S preset)
SCHEDULE_STEPS = 32

# (label, GFCG settings, whether a TAESD file is present)
ROWS = [("ATG", dict(SHIPPED, tau=0.0, mode="additive"), False),
        ("GFCG+ATG shipped, TAESD present", SHIPPED, True),
        ("GFCG+ATG shipped, no TAESD (full VAE)", SHIPPED, False),
        ("GFCG+ATG before (additive, every step, VAE x0.5)", BEFORE, False)]


@dataclasses.dataclass
class LatentPerfConfig:
    batch: int = 4
    steps: int = 4                  # Heun steps run, of the 32-step schedule
    reps: int = 3
    main: str = "s"                 # EDM2 img512 preset sizes (or "tiny" for the tests)
    guide: str = "xs"
    comfyui: Optional[str] = None
    seed: int = 0


def _network_checkpoint(size: str, seed: int):
    """An EDM2Checkpoint of a random-weight img512 network of preset ``size`` (EDM2's init)."""
    from ..edm2.checkpoint import EDM2Checkpoint
    from ..edm2.network import EDM2, EDM2Config
    from ..edm2.presets import preset_config
    from .train import force_normalize, init_edm2

    if size == "tiny":   # the tests: the same topology rules, a few channels
        cfg = EDM2Config(img_resolution=64, img_channels=4, label_dim=1000, model_channels=16, channel_mult=(1, 2),
                         num_blocks=1, attn_resolutions=(32,), channels_per_head=16)
    else:
        cfg = preset_config("img512", size)
    net = init_edm2(EDM2(cfg), torch.Generator().manual_seed(seed))
    force_normalize(net)
    with torch.no_grad():   # nonzero gains, so that every layer's output matters
        for name, p in net.named_parameters():
            if name.endswith("_gain"):
                p.fill_(1.0)
    sd = {k: v.detach().to(torch.float16) for k, v in net.state_dict().items()}
    return EDM2Checkpoint(cfg, sd, None, f"random img512-{size}")


class _RowCounter:
    """Counts the rows a network's forward sees (NFE = rows / batch)."""

    def __init__(self, module):
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        self.rows += int(args[0].shape[0])


def build(cfg: LatentPerfConfig) -> dict:
    """The ComfyUI objects of the setting (imports ComfyUI)."""
    from . import decode_bench

    where = decode_bench._import_comfyui(cfg.comfyui)
    import folder_paths

    from ..classifiers.comfy_classifier import ComfyClassifier
    from ..edm2.comfy_model import class_label_conditioning, model_from_checkpoint

    main = model_from_checkpoint(_network_checkpoint(cfg.main, 1))
    guide = model_from_checkpoint(_network_checkpoint(cfg.guide, 2))
    vae, vae_what = decode_bench.sd_vae()
    clf, clf_what = decode_bench.classifier()
    taesd_dir = tempfile.mkdtemp(prefix="gfcg_perf_taesd_")
    decode_bench.taesd_file(taesd_dir)          # registers the folder with ComfyUI
    empty_dir = tempfile.mkdtemp(prefix="gfcg_perf_no_taesd_")
    return {"comfyui": where, "main": main, "guide": guide, "vae": vae, "vae_what": vae_what,
            "classifier": ComfyClassifier(clf), "classifier_what": clf_what, "taesd_dir": taesd_dir,
            "empty_dir": empty_dir, "positive": class_label_conditioning([207]), "folder_paths": folder_paths}


def _forget_listing(fp) -> None:
    """ComfyUI lists vae_approx anew at its next lookup (its file-list cache dropped)."""
    if hasattr(fp, "filename_list_cache"):
        fp.filename_list_cache.pop("vae_approx", None)


def _taesd_present(env, present: bool) -> None:
    """ComfyUI's vae_approx paths for a row: only the benchmark's TAESD folder, or only an empty
    one (decode = auto looks there); ``restore_folders`` puts the user's paths back."""
    fp = env["folder_paths"]
    paths = fp.folder_names_and_paths["vae_approx"][0]
    env.setdefault("vae_approx_paths", list(paths))
    paths[:] = [env["taesd_dir"] if present else env["empty_dir"]]
    _forget_listing(fp)


def restore_folders(env) -> None:
    if "vae_approx_paths" in env:
        fp = env["folder_paths"]
        fp.folder_names_and_paths["vae_approx"][0][:] = env.pop("vae_approx_paths")
        _forget_listing(fp)


def close(env) -> None:
    """The user's vae_approx paths back, without the setting's two temporary folders, which are
    deleted (``build`` made them)."""
    restore_folders(env)
    fp = env["folder_paths"]
    paths = fp.folder_names_and_paths["vae_approx"][0]
    paths[:] = [p for p in paths if p not in (env["taesd_dir"], env["empty_dir"])]
    _forget_listing(fp)
    for d in (env["taesd_dir"], env["empty_dir"]):
        shutil.rmtree(d, ignore_errors=True)


def guider(env, settings: dict):
    from ..guiders.comfy_decode import _told
    from ..guiders.comfy_guider import GFCGGuider
    from ..guiders.config import GFCGConfig

    _told.clear()
    s = dict(settings)
    mode, decode, res = s.pop("mode"), s.pop("decode"), s.pop("decode_resolution")
    config = GFCGConfig(desired_class=207, **s)
    g = GFCGGuider(env["main"], config, env["classifier"], env["positive"], vae=env["vae"], decode=decode,
                   decode_resolution=res)
    return g.combined("atg", mode, ATG_SCALE, guide_patcher=env["guide"])


def run_row(env, label: str, cfg: LatentPerfConfig) -> dict:
    """One sampling run of a row: seconds, NFE per image (main + guide rows), classifier rows."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    _, settings, taesd = next(r for r in ROWS if r[0] == label)
    _taesd_present(env, taesd)
    g = guider(env, settings)
    decoder = g.decoder.method
    ms = env["main"].get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", SCHEDULE_STEPS)[:cfg.steps + 1]
    latent = {"samples": torch.zeros(cfg.batch, 4, 64, 64)}    # 512 x 512 images
    counters = [_RowCounter(env["main"].model.diffusion_model), _RowCounter(env["guide"].model.diffusion_model)]
    seen = [0]
    clf = env["classifier"].classifier
    orig = clf.forward

    def counting(x):
        seen[0] += int(x.shape[0])
        return orig(x)

    clf.forward = counting
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            SamplerCustomAdvanced().sample(Noise_RandomNoise(cfg.seed), g, comfy.samplers.sampler_object("heun"),
                                           sigmas, latent)
        seconds = time.perf_counter() - t0
    finally:
        clf.forward = orig
        for c in counters:
            c.handle.remove()
    return {"seconds": seconds, "nfe": sum(c.rows for c in counters) / cfg.batch,
            "main_nfe": counters[0].rows / cfg.batch, "guide_nfe": counters[1].rows / cfg.batch,
            "classifier_rows_per_image": seen[0] / cfg.batch, "decoder": decoder}


def run(cfg: LatentPerfConfig, progress=print) -> dict:
    env = build(cfg)
    labels = [r[0] for r in ROWS]
    small = dataclasses.replace(cfg, batch=1, steps=1)
    runs: Dict[str, List[dict]] = {label: [] for label in labels}
    try:
        for label in labels:                       # warm-up of every path
            run_row(env, label, small)
        for rep in range(cfg.reps):
            for label in labels:
                r = run_row(env, label, cfg)
                runs[label].append(r)
                progress(f"latent rep {rep + 1}/{cfg.reps} {label:<48} {r['seconds']:7.1f} s  NFE {r['nfe']:.1f}  "
                         f"classifier rows {r['classifier_rows_per_image']:.1f} ({r['decoder']})")
    finally:
        close(env)
    rows = []
    for label in labels:
        rs = runs[label]
        rows.append({"row": label, **rs[0], "seconds": statistics.median(r["seconds"] for r in rs),
                     "seconds_all": [r["seconds"] for r in rs]})
    atg = rows[0]
    for r in rows:
        r["seconds_vs_ATG"] = r["seconds"] / atg["seconds"]
        r["nfe_vs_ATG"] = r["nfe"] / atg["nfe"]
    return {"batch": cfg.batch, "steps": cfg.steps, "schedule_steps": SCHEDULE_STEPS, "reps": cfg.reps,
            "main": f"EDM2 img512-{cfg.main}", "guide": f"EDM2 img512-{cfg.guide}", "atg_scale": ATG_SCALE,
            "vae": env["vae_what"], "taesd": "TAESD architecture, random weights", "classifier": env["classifier_what"],
            "shipped": SHIPPED, "before": BEFORE, "device": "cpu" if not torch.cuda.is_available()
            else torch.cuda.get_device_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "comfyui": env["comfyui"], "rows": rows, "targets": targets(rows)}


def targets(rows: List[dict]) -> List[dict]:
    """The issue's targets on this setting: shipped GFCG + ATG <= 1.05 x ATG's wall time, NFE = ATG's."""
    by = {r["row"]: r for r in rows}
    out = []
    for label in ("GFCG+ATG shipped, TAESD present", "GFCG+ATG shipped, no TAESD (full VAE)"):
        r = by[label]
        out.append({"row": label, "measure": "seconds", "limit": 1.05, "ratio": r["seconds_vs_ATG"],
                    "met": r["seconds_vs_ATG"] <= 1.05})
        out.append({"row": label, "measure": "nfe", "limit": 1.0, "ratio": r["nfe_vs_ATG"],
                    "met": r["nfe_vs_ATG"] <= 1.0 + 1e-12})
    return out


def markdown(res: dict) -> str:
    sh = res["shipped"]
    lines = [f"Latent model through ComfyUI: {res['main']} guided by {res['guide']} (pack's EDM2 network, random "
             f"weights), batch {res['batch']}, Heun on the first {res['steps']} steps of the {res['schedule_steps']}-step "
             f"karras schedule, autoguidance weight {res['atg_scale']}; VAE: {res['vae']}; TAESD: {res['taesd']}; "
             f"classifier: {res['classifier']}; {res['device']}, {res['threads']} threads, torch {res['torch']}; wall "
             f"time = median of {res['reps']} interleaved runs. Shipped: {sh['mode']}, tau {sh['tau']}, alpha "
             f"{sh['alpha']}, period {sh['period']}, settle after {sh['settle_after']}, decode {sh['decode']} at "
             f"resolution {sh['decode_resolution']} (auto). Random weights: the classifier is never confident, so every "
             "sample is guided on every classifier step (the worst case for the cost).", "",
             "| method | decoder used | NFE / image (main + guide) | classifier rows / image | wall time (s) | runs (s) | "
             "× ATG |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        dec = "—" if r["classifier_rows_per_image"] == 0 else r["decoder"]
        lines.append(f"| {r['row']} | {dec} | {r['nfe']:.1f} ({r['main_nfe']:.1f} + {r['guide_nfe']:.1f}) | "
                     f"{r['classifier_rows_per_image']:.1f} | {r['seconds']:.1f} | "
                     f"{min(r['seconds_all']):.1f}–{max(r['seconds_all']):.1f} | {r['seconds_vs_ATG']:.3f} |")
    lines += ["", "| target | measured | met |", "| --- | ---: | --- |"]
    for t in res["targets"]:
        what = "wall time" if t["measure"] == "seconds" else "NFE"
        lines.append(f"| {t['row']}: {what} <= {t['limit']:g} × ATG | {t['ratio']:.3f} × | "
                     f"{'yes' if t['met'] else 'NO, by ' + format(t['ratio'] / t['limit'] - 1, '.1%')} |")
    return "\n".join(lines) + "\n"


def main_cli(out_dir: str, cfg: LatentPerfConfig) -> dict:
    from .report import write_result

    res = run(cfg)
    print(write_result(out_dir, "perf_latent", res, markdown(res)))
    return res


if __name__ == "__main__":   # python -m comfyui_gfcg.testbed.perf_latent [steps] [reps]
    import sys

    a = sys.argv[1:]
    main_cli(os.path.join("testbed", "results"),
             LatentPerfConfig(steps=int(a[0]) if a else 4, reps=int(a[1]) if len(a) > 1 else 3))
