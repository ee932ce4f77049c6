"""``python -m comfyui_gfcg demo | bench | sweep | cgbench | decodebench | train | toy``: the testbed's commands."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _write(out: str, stem: str, result: dict, table: str) -> str:
    from .testbed.report import write_result

    return write_result(out, stem, result, table)


def _settings(args):
    from .testbed.bench import Settings

    return Settings(steps=args.steps, dtype=args.dtype)


def demo(args) -> int:
    from .testbed.bench import METHOD_LABELS, demo as run_demo

    print(f"GFCG testbed demo: 6 methods x 10 classes x {args.n_per_class} samples, {args.steps} Heun steps, "
          f"seed {args.seed}, {args.dtype} trunk")
    res = run_demo(args.out, n_per_class=args.n_per_class, seed=args.seed, settings=_settings(args))
    print(f"{'method':<10} {'class precision':>16} {'pair accuracy':>14} {'NFE / image':>12}")
    for r in res["rows"]:
        print(f"{METHOD_LABELS[r['method']]:<10} {r['class_precision']:>16.3f} {r['pair_accuracy']:>14.3f} "
              f"{r['nfe']:>12.1f}")
    print(f"({res['n_per_class'] * 10} samples per method: a glimpse; `python -m comfyui_gfcg bench` has the numbers)")
    print(f"wrote {os.path.join(args.out, 'demo_grid.png')} and demo.json in {res['seconds']:.0f} s")
    return 0


def toy(args) -> int:
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


def perf(args) -> int:
    if args.memory_study:
        from .testbed import perf_memory as M

        res = M.run(args.rows, n=args.n, dtype=args.dtype, progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(_write(args.out, "perf_memory", res, M.markdown(res)))
        print(f"wrote perf_memory.json and perf_memory.md to {args.out}")
        return 0
    if args.latent and args.host_reads:
        from .testbed import perf_latent as L
        from .testbed import perf_syncs as S

        tiny = "tiny" if args.tiny else None
        cfg = L.LatentPerfConfig(batch=args.batch, steps=args.latent_steps, reps=1, comfyui=args.comfyui,
                                 main=tiny or "s", guide=tiny or "xs")
        res = S.run(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(_write(args.out, "host_reads", res, S.markdown(res)))
        print(f"wrote host_reads.json and host_reads.md to {args.out}")
        return 0
    if args.latent:
        from .testbed import perf_latent as L

        cfg = L.LatentPerfConfig(steps=args.latent_steps, reps=max(3, args.reps), comfyui=args.comfyui)
        res = L.run(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(_write(args.out, "perf_latent", res, L.markdown(res)))
        print(f"wrote perf_latent.json and perf_latent.md to {args.out}")
        return 0
    from .testbed import perf as P

    cfg = P.PerfConfig(n=args.n, reps=args.reps, seed=args.seed, settings=_settings(args),
                       rows=args.rows or [r[0] for r in P.ROWS], memory=not args.no_memory, decode=not args.no_decode,
                       comfyui=args.comfyui)
    res = P.run(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    table = _write(args.out, "perf", res, P.markdown(res))
    print(table)
    print(f"wrote perf.json and perf.md to {args.out}")
    return 0


def frontier(args) -> int:
    from .testbed import frontier as F

    if not args.report:
        k, n = (int(v) for v in args.shard.split("/"))
        if not 0 <= k < n:
            print(f"--shard: {args.shard!r} is not allowed; K/N with 0 <= K < N, e.g. 0/2", file=sys.stderr)
            return 2
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        log = lambda line: print(line, file=sys.stderr, flush=True)   # noqa: E731
        if args.timing:
            F.time_points((k, n), progress=log)
        else:
            F.run((k, n), progress=log)
    res = F.write(args.out)
    print(F.markdown(res))
    print(f"wrote frontier.json, frontier.md and frontier.png to {args.out} ({len(res['rows'])} of "
          f"{res['points_total']} points)")
    return 0


def bench(args) -> int:
    if args.frontier:
        return frontier(args)
    if args.perf:
        return perf(args)
    if args.configs:
        from .testbed.bench import compare_configs, configs_markdown

        res = compare_configs(n_per_class=args.n_per_class, settings=_settings(args), seed=args.seed)
        print(_write(args.out, "configs", res, configs_markdown(res)))
        print(f"wrote configs.json and configs.md to {args.out}")
        return 0
    from .testbed.bench import benchmark, markdown_table, plot_benchmark

    tb = None
    if args.weights:
        from .testbed.models import load_testbed
        tb = load_testbed(args.dtype, args.weights)
    res = benchmark(args.methods, n_per_class=args.n_per_class, settings=_settings(args), seed=args.seed, tb=tb)
    table = _write(args.out, "bench", res, markdown_table(res))
    plot_benchmark(res, os.path.join(args.out, "bench.png"))
    print(table)
    print(f"wrote bench.json, bench.md and bench.png to {args.out}")
    return 0


def sweep(args) -> int:
    from .testbed.bench import run_sweep

    import dataclasses

    st = _settings(args)
    st = dataclasses.replace(st, gfcg=dataclasses.replace(st.gfcg, alpha=args.alpha))
    run_sweep(args.out, n_per_class=args.n_per_class, settings=st, seed=args.seed, only=args.only)
    return 0


def cgbench(args) -> int:
    from .testbed.bench import cg_benchmark, cg_markdown_table

    res = cg_benchmark(n_per_class=args.n_per_class, settings=_settings(args), seed=args.seed,
                       **({} if args.scale is None else {"scale": args.scale}))
    table = _write(args.out, "cg_bench", res, cg_markdown_table(res))
    print(table)
    print(f"wrote cg_bench.json and cg_bench.md to {args.out}")
    return 0


def decodebench(args) -> int:
    from .testbed.decode_bench import main as run_decode_bench

    return run_decode_bench(args)


def train(args) -> int:
    from .testbed.files import FILES, WEIGHTS_DIR

    if args.curve:
        from .testbed.curve import curve_markdown, plot_curve, training_curve

        out = os.path.join("testbed", "results")
        prev = os.path.join(out, "training_curve.json")
        earlier = json.load(open(prev)) if os.path.exists(prev) else None
        res = training_curve(args.curve, progress=lambda line: print(line, file=sys.stderr, flush=True),
                             earlier=earlier)
        print(_write(out, "training_curve", res, curve_markdown(res)))
        plot_curve(res, os.path.join(out, "training_curve.png"))
        print(f"wrote training_curve.json, .md and .png to {out}")
        return 0
    from .testbed.train import plot_loss_curves, train_testbed

    names = args.only or list(FILES)
    bad = [n for n in names if n not in FILES]
    if bad:
        print(f"--only: unknown model(s) {bad}; allowed: {list(FILES)}", file=sys.stderr)
        return 2
    out = args.out or WEIGHTS_DIR
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.iterations:
        import dataclasses

        from .testbed import train as T
        for n in names:   # a longer (or shorter) run of the same recipe, e.g. to continue the main run
            T.RECIPES[n] = dataclasses.replace(T.RECIPES[n], iterations=args.iterations)
    record = train_testbed(names, out, stop_after=None if args.stop_after is None else 60 * args.stop_after,
                           warm_start=args.warm_start)
    if any(n in record for n in FILES):
        plot_loss_curves(record, os.path.join(out, "loss_curves.png"))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m comfyui_gfcg")
    sub = p.add_subparsers(dest="cmd", required=True)

    def sampling_args(q, n_per_class, out, seed=0):
        q.add_argument("--n-per-class", type=int, default=n_per_class, help="samples per class and method")
        q.add_argument("--seed", type=int, default=seed, help="noise seed of the first batch (then +1 per batch)")
        q.add_argument("--steps", type=int, default=18, help="Heun steps on the EDM2 sigma schedule")
        q.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                       help="the diffusion models' trunk dtype (the classifiers stay float32)")
        q.add_argument("--out", default=out)

    d = sub.add_parser("demo", help="testbed demo: a grid of every guidance method x class, with precision")
    sampling_args(d, 2, "out")
    b = sub.add_parser("bench", help="testbed benchmark: precision, FD, precision/recall, NFE, time per method")
    sampling_args(b, 100, os.path.join("testbed", "results"))
    b.add_argument("--weights", default=None, help="a folder laid out as testbed/weights (default: the committed "
                   "models); e.g. to measure a training snapshot")
    b.add_argument("--methods", nargs="*", default=["none", "cfg", "atg", "gfcg", "gfcg+cfg", "gfcg+atg"])
    b.add_argument("--configs", action="store_true", help="instead: GFCG + ATG as shipped before, in swap mode and "
                   "as shipped now, against ATG, with paired bounds (testbed/results/configs.md)")
    b.add_argument("--frontier", action="store_true", help="instead: every method along its own knob (CFG / "
                   "ATG w, GFCG alpha and swap rules, gradient guidance s), 1000 samples a point on the same "
                   "noises, resumable (one file a point in testbed/results/frontier_rows); writes frontier.json, "
                   ".md, .png")
    b.add_argument("--shard", default="0/1", help="--frontier: run points i with i mod N = K (K/N), e.g. 0/2 and "
                   "1/2 in two processes")
    b.add_argument("--threads", type=int, default=1, help="--frontier: CPU threads per process (wall times are "
                   "per image at this count)")
    b.add_argument("--report", action="store_true", help="--frontier: only write the report from the stored points")
    b.add_argument("--timing", action="store_true", help="--frontier: time every stored point again on one batch of "
                   "100 (one process a core, nothing else running; the report's wall times then come from it)")
    b.add_argument("--perf", action="store_true", help="the cost benchmark instead: NFE, forwards per evaluation, "
                   "wall time against CFG and ATG, peak memory, classifier-step cost per decode choice; writes "
                   "perf.json and perf.md")
    b.add_argument("--latent", action="store_true", help="--perf: the latent-model setting instead (EDM2-S img512 "
                   "+ XS guide, SD VAE / TAESD, ResNet-50, random weights, through ComfyUI; perf_latent.md)")
    b.add_argument("--memory-study", action="store_true", help="--perf: where the extra CPU memory of varying "
                   "row counts goes (oneDNN's cache) and what each remedy costs: default, cache off, padded row "
                   "buckets; perf_memory.md")
    b.add_argument("--host-reads", action="store_true", help="--perf --latent: count each row's host "
                   "synchronisations instead of timing it (CUDA's sync debug mode on a GPU, the host reads a GPU "
                   "would make on the CPU), by the line that made them; host_reads.md")
    b.add_argument("--tiny", action="store_true", help="--perf --latent --host-reads: tiny EDM2 networks (the "
                   "count does not depend on their size)")
    b.add_argument("--batch", type=int, default=4, help="--perf --latent --host-reads: images per run")
    b.add_argument("--latent-steps", type=int, default=4, help="--perf --latent: Heun steps run, of the shipped "
                   "32-step schedule")
    b.add_argument("--n", type=int, default=64, help="--perf: images per run (one batch)")
    b.add_argument("--reps", type=int, default=5, help="--perf: timed repetitions per method (median)")
    b.add_argument("--rows", nargs="*", default=None, help="--perf: rows to run (default: all)")
    b.add_argument("--no-memory", action="store_true", help="--perf: skip the peak-memory runs")
    b.add_argument("--no-decode", action="store_true", help="--perf: skip the decode choices of a latent model")
    b.add_argument("--comfyui", default=None, help="--perf: ComfyUI checkout for the decode choices (default: "
                   "COMFYUI_PATH or ../ComfyUI; skipped when none is found)")
    w = sub.add_parser("sweep", help="testbed sweep of the GFCG settings (sets the node defaults)")
    sampling_args(w, 20, os.path.join("testbed", "results"), seed=1000)
    w.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    w.add_argument("--alpha", type=float, default=2.0, help="the base alpha the rows vary around (2: the default "
                   "before the sweep set it to 4; the committed sweep's base)")
    c = sub.add_parser("cgbench", help="testbed: off-the-shelf gradient classifier guidance (EluCD) with its "
                       "pre-conditioning steps switched on in turn, next to GFCG, with wall time")
    sampling_args(c, 100, os.path.join("testbed", "results"))
    c.add_argument("--scale", type=float, default=None, help="CG scale s (default: the testbed's, from the sweep)")
    e = sub.add_parser("decodebench", help="cost and classifier agreement of the decode choices (vae, taesd, "
                       "latent_rgb, half resolution) for a latent model; needs a ComfyUI checkout")
    e.add_argument("--n", type=int, default=8, help="estimates for the agreement")
    e.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    e.add_argument("--vae", default=None, help="a real SD VAE file (default: random weights)")
    e.add_argument("--taesd", default=None, help="a real taesd_decoder file (default: random weights)")
    e.add_argument("--classifier", default=None, help="a timm classifier file (default: random resnet50)")
    e.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: COMFYUI_PATH or ../ComfyUI)")
    e.add_argument("--out", default=os.path.join("testbed", "results"))
    o = sub.add_parser("toy", help="the analytic toy: class precision per guidance method (no weights)")
    o.add_argument("--n", type=int, default=2000)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--out", default="out")
    t = sub.add_parser("train", help="train the testbed models (weights, training.json, loss_curves.png)")
    t.add_argument("--only", nargs="*", default=None, help="model names (default: all): main guide "
                   "guidance_classifier eval_classifier")
    t.add_argument("--out", default=None, help="folder (default: the pack's testbed/weights)")
    t.add_argument("--stop-after", type=float, default=None, help="minutes after which a diffusion model's "
                   "training saves its state (testbed/checkpoints) and stops; the same command resumes it")
    t.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    t.add_argument("--iterations", type=int, default=0, help="train the named models for this many iterations "
                   "instead of their recipe's (e.g. continue the main run past the committed snapshot)")
    t.add_argument("--warm-start", action="store_true", help="where a diffusion model's checkpoint is missing "
                   "(testbed/checkpoints is not in git), rebuild it from the committed weights and record and "
                   "go on from there (network and EMA from the weights, Adam's moments from zero)")
    t.add_argument("--curve", default=None, metavar="NAME", help="instead of training: sample every EMA snapshot "
                   "of run NAME (e.g. main) unguided and write testbed/results/training_curve.{json,md,png}")
    args = p.parse_args(argv)
    return {"train": train, "demo": demo, "bench": bench, "sweep": sweep, "toy": toy, "cgbench": cgbench,
            "decodebench": decodebench}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
