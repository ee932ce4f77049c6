"""``python -m comfyui_gfcg.edm2``: convert NVlabs EDM2 .pkl files to safetensors, inspect, count.

    python -m comfyui_gfcg.edm2 convert IN.pkl OUT.safetensors [--dtype keep|fp16|bf16|fp32]
    python -m comfyui_gfcg.edm2 info FILE
    python -m comfyui_gfcg.edm2 params

The conversion reads the pickle with the safe reader (nothing in the file is executed) and writes
the ``ema`` network's raw weights with the config and the encoder constants as metadata. The
weights stay NVIDIA's, under CC BY-NC-SA 4.0; keep the converted file for your own use.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .checkpoint import CheckpointError, read_checkpoint, save_safetensors
from .presets import PUBLISHED_PARAMS_M, SIZES, preset_config
from .network import count_parameters

DTYPES = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _describe(ckpt) -> str:
    c = ckpt.config
    n = sum(v.numel() for v in ckpt.state_dict.values())
    dts = sorted({str(v.dtype).replace("torch.", "") for v in ckpt.state_dict.values()})
    enc = ckpt.encoder or {}
    return (f"{ckpt.source}: family {ckpt.family}, model_channels {c.model_channels}, "
            f"label_dim {c.label_dim} ({'conditional' if c.label_dim else 'unconditional'}), "
            f"{len(ckpt.state_dict)} tensors, {n / 1e6:.1f} M elements ({', '.join(dts)}), "
            f"encoder {enc.get('kind', 'none')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m comfyui_gfcg.edm2", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="NVlabs .pkl -> .safetensors (safe reader, config in metadata)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="weight dtype to store (default: as in the file)")
    i = sub.add_parser("info", help="describe an EDM2 checkpoint (.pkl or .safetensors)")
    i.add_argument("path")
    sub.add_parser("params", help="parameter counts of every published preset shape (no weights needed)")
    a = p.parse_args(argv)
    try:
        if a.cmd == "convert":
            if not a.dst.endswith(".safetensors"):
                p.error("OUT must end with .safetensors")
            ckpt = read_checkpoint(a.src)
            save_safetensors(ckpt, a.dst, DTYPES[a.dtype])
            print(_describe(ckpt))
            print(f"wrote {a.dst}")
        elif a.cmd == "info":
            print(_describe(read_checkpoint(a.path)))
        else:
            for fam, sizes in SIZES.items():
                for size in sizes:
                    cond = count_parameters(preset_config(fam, size, True))
                    unc = count_parameters(preset_config(fam, size, False))
                    ref = PUBLISHED_PARAMS_M.get(size) if fam == "img512" else None
                    note = f"  (EDM2 note: {ref} M)" if ref else ""
                    print(f"{fam}-{size:<4} conditional {cond / 1e6:9.1f} M   unconditional {unc / 1e6:9.1f} M{note}")
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
