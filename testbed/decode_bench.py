"""``python -m comfyui_gfcg decodebench``: what each decode choice costs the classifier path of a
latent model, and how far the classifier's view moves from the full-VAE decode.

Setting: EDM2-S img512 (the pack's own EDM2 network, 64 x 64 x 4 latents, the SD VAE), batch 1,
one denoiser evaluation as the unit of cost. Decoders are ComfyUI's own: the SD VAE (ComfyUI's
``VAE``), TAESD (``comfy.taesd``) and the latent format's latent-to-RGB factors, through the
pack's ``PixelDecoder``, each also at half resolution. The classifier is a timm ResNet-50.

Weights: real files where given (``--vae``, ``--taesd``, ``--classifier``), else random weights
of the same architectures (costs do not depend on the weights; agreement with random weights
does, and says little -- the committed table states which were used). Needs a ComfyUI checkout
(``COMFYUI_PATH`` or ``../ComfyUI``).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROWS = [("vae", 1.0), ("vae", 0.5), ("taesd", 1.0), ("taesd", 0.5), ("latent_rgb", 1.0), ("latent_rgb", 0.5)]


def _import_comfyui(path=None):
    loaded = sys.modules.get("comfy.samplers")
    if loaded is not None:   # already imported (e.g. by the tests): that tree
        return str(Path(loaded.__file__).resolve().parent.parent)
    here = Path(__file__).resolve().parent
    cands = [path, os.environ.get("COMFYUI_PATH"), here.parent / "ComfyUI"]
    for c in cands:
        if c and (Path(c) / "comfy" / "samplers.py").is_file():
            if str(c) not in sys.path:
                sys.path.insert(0, str(c))
            from comfy.cli_args import args

            if not torch.cuda.is_available():
                args.cpu = True
            import comfy.model_management  # noqa: F401  (after args.cpu)
            return str(c)
    raise SystemExit("decodebench needs a ComfyUI checkout: set COMFYUI_PATH or clone it to ../ComfyUI")


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """ComfyUI builds layers without initialising them: give every parameter a finite value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim <= 1:
                p.copy_(torch.ones_like(p) if "norm" in name and name.endswith("weight") else torch.zeros_like(p))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)


def sd_vae(path=None):
    import comfy.sd
    import comfy.utils

    if path:
        return comfy.sd.VAE(sd=comfy.utils.load_torch_file(path, safe_load=True)), os.path.basename(path)
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    m = AutoencoderKL(ddconfig=dd, embed_dim=4)
    _randomise(m, 1)
    return comfy.sd.VAE(sd=m.state_dict()), "SD VAE architecture, random weights"


def taesd_file(folder, path=None):
    """A TAESD decoder file in a vae_approx folder (the given one, or random weights)."""
    import folder_paths

    if path:
        folder_paths.add_model_folder_path("vae_approx", os.path.dirname(os.path.abspath(path)))
        return os.path.basename(path)
    from safetensors.torch import save_file

    from comfy.taesd.taesd import TAESD

    dec = TAESD(latent_channels=4).taesd_decoder
    _randomise(dec, 2)
    save_file({k: v.contiguous() for k, v in dec.state_dict().items()}, os.path.join(folder, "taesd_decoder.safetensors"))
    folder_paths.add_model_folder_path("vae_approx", folder)
    return "TAESD architecture, random weights"


def classifier(path=None):
    import timm

    from ..classifiers import load_timm_classifier
    from ..classifiers.timm_classifier import DataConfig, ImageClassifier
    from ..classifiers.vocab import imagenet_class_names

    if path:
        return load_timm_classifier(path), os.path.basename(path)
    torch.manual_seed(3)
    net = timm.create_model("resnet50", pretrained=False, num_classes=1000)
    cfg = DataConfig.from_timm(dict(timm.data.resolve_model_data_config(net)))
    return ImageClassifier(net, cfg, imagenet_class_names(), "resnet50"), "timm resnet50, random weights"


class _ModelShim:
    """What ``PixelDecoder`` asks of a ComfyUI model: its latent format and process_latent_out."""

    def __init__(self, fmt):
        self.latent_format = fmt

    def process_latent_out(self, x):
        return self.latent_format.process_out(x)


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.no_grad()
def run(n: int = 8, reps: int = 3, vae_path=None, taesd_path=None, classifier_path=None, comfyui=None,
        seed: int = 0, agreement: bool = True, gradient: bool = True) -> dict:
    """The table's rows; ``agreement`` / ``gradient`` False leave those columns out (None)."""
    import tempfile

    where = _import_comfyui(comfyui)
    from ..edm2.comfy_model import EDM2LatentFormat
    from ..edm2.network import EDM2
    from ..edm2.presets import preset_config
    from ..guiders.comfy_decode import PixelDecoder

    vae, vae_what = sd_vae(vae_path)
    tmp = tempfile.mkdtemp(prefix="gfcg_vae_approx_")
    taesd_what = taesd_file(tmp, taesd_path)
    clf, clf_what = classifier(classifier_path)
    model = _ModelShim(EDM2LatentFormat())

    net = EDM2(preset_config("img512", "s"))
    net.eval()
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(1, 4, 64, 64, generator=g)
    denoiser_s = _time(lambda: net(x1, 1.0, torch.nn.functional.one_hot(torch.tensor([207]), 1000).float()), reps)
    # estimates in EDM2 model space (unit-variance channels, what D(x; sigma) returns)
    lat = torch.randn(n, 4, 64, 64, generator=g) * 0.5
    classify_s = _time(lambda: clf(torch.rand(1, 3, 512, 512)), reps)

    from ..guiders.gradient import guidance_gradient, softplus_copy

    smooth, _ = softplus_copy(clf, 5.0)
    full = PixelDecoder(vae, "vae", 1.0)
    ref_p = torch.cat([torch.softmax(clf(full(model, lat[i:i + 1])), 1) for i in range(n)]) if agreement else None
    rows = []
    for method, res in ROWS:
        dec = PixelDecoder(vae, method, res)
        one = lat[:1]
        decode_s = _time(lambda: dec(model, one), reps)
        grad_s = agree = tv = None
        if gradient:
            dec.prepare_gradients()   # what the gradient guider does per run
            grad_s = _time(lambda: guidance_gradient(lambda z: smooth(dec(model, z)), one, torch.tensor([207]), 1.0,
                                                     0.0), reps)
            dec.release()
        if agreement:
            p = torch.cat([torch.softmax(clf(dec(model, lat[i:i + 1])), 1) for i in range(n)])
            agree = float((p.argmax(1) == ref_p.argmax(1)).float().mean())
            tv = float(0.5 * (p - ref_p).abs().sum(1).mean())
        rows.append({"decode": method, "resolution": res, "decode_s": decode_s, "decode_rel": decode_s / denoiser_s,
                     "path_rel": (decode_s + classify_s) / denoiser_s, "grad_s": grad_s,
                     "grad_rel": None if grad_s is None else grad_s / denoiser_s, "top1_agreement": agree,
                     "mean_tv": tv})
        print(f"{method:>10} x{res:<4} decode {decode_s * 1000:8.1f} ms = {decode_s / denoiser_s:6.3f} denoiser evals"
              + ("" if agree is None else f"; top-1 agreement {agree:.2f}, TV {tv:.3f}"), flush=True)
    return {"denoiser": "EDM2-S img512 (pack's EDM2 network, random weights), batch 1, 64x64x4",
            "denoiser_s": denoiser_s, "classifier": clf_what, "classify_s": classify_s, "vae": vae_what,
            "taesd": taesd_what, "n_estimates": n, "reps": reps, "device": "cpu" if not torch.cuda.is_available()
            else torch.cuda.get_device_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "comfyui": where, "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"Unit: one EDM2-S img512 denoiser evaluation = {res['denoiser_s'] * 1000:.0f} ms ({res['device']}, "
             f"{res['threads']} threads); classifier ({res['classifier']}) forward = {res['classify_s'] * 1000:.0f} ms "
             f"= {res['classify_s'] / res['denoiser_s']:.3f} evaluations. VAE: {res['vae']}; TAESD: {res['taesd']}. "
             f"Agreement over {res['n_estimates']} estimates.", "",
             "| decode | resolution | decode time | decode / denoiser eval | decode + classify / denoiser eval "
             "(GFCG's path) | gradient: decode + classify, forward + backward / denoiser eval (CG's path) | "
             "top-1 agreement with full VAE | mean TV distance of p |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        lines.append(f"| {r['decode']} | {r['resolution']:g} | {r['decode_s'] * 1000:.1f} ms | {r['decode_rel']:.3f} | "
                     f"{r['path_rel']:.3f} | {r['grad_rel']:.3f} | {r['top1_agreement']:.2f} | {r['mean_tv']:.3f} |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    res = run(n=args.n, reps=args.reps, vae_path=args.vae, taesd_path=args.taesd, classifier_path=args.classifier,
              comfyui=args.comfyui)
    from .report import write_result as _write

    print(_write(args.out, "decode_bench", res, markdown(res)))
    print(f"wrote decode_bench.json and decode_bench.md to {args.out}")
    return 0
