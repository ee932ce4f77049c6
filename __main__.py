"""``python -m comfyui_gfcg demo``: the analytic toy demo (see testbed/toy.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys


def demo(args) -> int:
    from .testbed.toy import Toy, sample

    toy = Toy()
    methods = ["none", "cfg", "atg", "gfcg", "gfcg+cfg", "gfcg+atg"]
    rows = []
    print(f"toy: {toy.classes} Gaussian classes, a weak model, Bayes classifier; {args.n} samples per class and method")
    print(f"{'method':<10} {'class precision':>16} {'model evals / sample':>22}")
    for m in methods:
        precs, nfes = [], []
        for c in range(toy.classes):
            _, p, nfe = sample(toy, m, c, n=args.n, seed=args.seed + c)
            precs.append(p)
            nfes.append(nfe)
        prec, nfe = sum(precs) / len(precs), sum(nfes) / len(nfes)
        rows.append({"method": m, "precision": prec, "evals_per_sample": nfe})
        print(f"{m:<10} {prec:>16.3f} {nfe:>22.1f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "toy_demo.json")
    with open(path, "w") as f:
        json.dump({"seed": args.seed, "n": args.n, "rows": rows}, f, indent=2)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m comfyui_gfcg")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="analytic toy demo: class precision per guidance method")
    d.add_argument("--n", type=int, default=2000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="out")
    args = p.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
