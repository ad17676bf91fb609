"""Memory: ranking streams its statistics, and a long fine-tune does not grow epoch over epoch.

1. Ranking (``scores.compute``: hrank + the mean-activation tie-break, one hooked pass) at N
   and 4N calibration images, each in a *fresh* process: peak RSS (``ru_maxrss``) must agree
   within 10%, because per-unit sums are accumulated batch by batch, never per image.
2. Fine-tuning (``train.fit`` on the embedded digits, checkpoints written every epoch) for
   several epochs in a fresh process: resident memory after each epoch must stay flat
   (last epoch within 5% of the second; the first epoch pays one-off allocator warm-up).

    python benchmarks/bench_memory.py                       # N=256 vs 1024, 6 epochs
    python benchmarks/bench_memory.py --n 128 --epochs 4     # quicker
    python benchmarks/bench_memory.py --json                 # machine-readable

Runs on CPU with 1 intra-op thread (steady numbers on a shared machine). Exit code 1 if a
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK_TOL = 0.10
EPOCH_TOL = 0.05


def rss_mb() -> float:
    """Current resident set size (VmRSS) in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(name: str, width_div: int):
    from compressor.models import get_model

    base = get_model(name)
    cfg = [c if c == "M" else max(4, c // width_div) for c in base.cfg]
    return get_model(name, cfg=cfg).eval()


def _floats_per_image(model, x) -> int:
    """Activation floats one image produces at the rank points: what a per-image store would keep."""
    import torch

    from compressor.pruning import graph

    sizes: list[int] = []
    mods = dict(model.named_modules())
    hooks = [mods[p].register_forward_hook(lambda _m, _i, o: sizes.append(o[0].numel()))
             for u in graph.units(model) for p in u.rank_points]
    try:
        with torch.no_grad():
            model(x[None])
    finally:
        for h in hooks:
            h.remove()
    return sum(sizes)


def child_rank(n: int, model_name: str, width_div: int, batch: int, criteria: list[str]) -> dict:
    """In a fresh process: build, load digits, then rank n images; report RSS around the pass."""
    import torch

    from compressor import data
    from compressor.pruning import scores

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _model(model_name, width_div)
    bundle = data.digits(input_size=model.input_size)
    with torch.no_grad():  # warm-up: allocator, kernels and thread pools exist before we measure
        model(torch.stack([bundle.train_eval[i][0] for i in range(batch)]))
    per_image = _floats_per_image(model, bundle.train_eval[0][0])
    calib = data.calibration_subset(bundle.train_eval, n, 0)
    before_rss, before_peak = rss_mb(), peak_mb()
    t0 = time.perf_counter()
    sc = scores.compute(model, data.loader(calib, batch), criteria, n_images=n, seed=0, progress=False)
    secs = time.perf_counter() - t0
    assert sc.meta["n_images"] == n
    return {"n": n, "rss_before_mb": before_rss, "peak_before_mb": before_peak, "peak_after_mb": peak_mb(),
            "rss_after_mb": rss_mb(), "seconds": secs,
            "unstreamed_mb": n * per_image * 4 / 2**20}


def child_finetune(epochs: int, model_name: str, width_div: int, batch: int) -> dict:
    """In a fresh process: fine-tune on digits for ``epochs``, recording RSS after each epoch."""
    import torch

    from compressor import data
    from compressor.training.train import TrainConfig, fit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _model(model_name, width_div)
    bundle = data.digits(input_size=model.input_size)
    rows: list[dict] = []
    t0 = time.perf_counter()

    def log(r: dict) -> None:
        rows.append({"epoch": r["epoch"], "rss_mb": rss_mb(), "peak_mb": peak_mb(),
                     "train_loss": r.get("train_loss"), "seconds": time.perf_counter() - t0})

    with tempfile.TemporaryDirectory() as out:  # last.pt / best.pt written every epoch, as in real runs
        fit(model, bundle, TrainConfig(epochs=epochs, batch_size=batch, lr=0.02, amp=False, seed=0), "cpu",
            progress=False, log=log, out_dir=out)
    return {"epochs": rows}


def _run_child(kind: str, args: argparse.Namespace, value: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--_child-{kind}", str(value), "--model", args.model,
           "--width-div", str(args.width_div), "--batch-size", str(args.batch_size), "--criteria", args.criteria]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"child {kind} {value} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="calibration images N (also run at 4N; digits has 1294)")
    ap.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs")
    ap.add_argument("--model", default="vgg16_bn")
    ap.add_argument("--width-div", type=int, default=4, help="divide every width of the model by this")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--criteria", default="hrank", help="comma-separated criteria for the rank pass")
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_child-rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_child-finetune", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    crits = [c for c in args.criteria.split(",") if c]
    if args._child_rank is not None:
        print(json.dumps(child_rank(args._child_rank, args.model, args.width_div, args.batch_size, crits)))
        return 0
    if args._child_finetune is not None:
        print(json.dumps(child_finetune(args._child_finetune, args.model, args.width_div, args.batch_size)))
        return 0

    ok = True
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "model": f"{args.model} widths/{args.width_div}", "batch_size": args.batch_size}
    ranks = [_run_child("rank", args, n) for n in (args.n, 4 * args.n)]
    ratio = ranks[1]["peak_after_mb"] / ranks[0]["peak_after_mb"]
    rank_ok = ratio <= 1 + RANK_TOL
    ok &= rank_ok
    result["rank"] = {"runs": ranks, "peak_ratio": ratio, "ok": rank_ok}
    if not args.skip_finetune:
        ft = _run_child("finetune", args, args.epochs)["epochs"]
        ref = ft[1]["rss_mb"] if len(ft) > 1 else ft[0]["rss_mb"]
        growth = (ft[-1]["rss_mb"] - ref) / ref
        ft_ok = growth <= EPOCH_TOL
        ok &= ft_ok
        result["finetune"] = {"epochs": ft, "growth_after_epoch_2": growth, "ok": ft_ok}

    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if ok else 1
    print(f"# memory ({result['model']}, batch {args.batch_size}, digits, CPU 1 thread; {result['machine']})\n")
    print(f"## ranking ({args.criteria} + mean-activation tie-break), one fresh process per N\n")
    print("| images | RSS before pass | peak before pass | peak after pass | pass adds | maps if kept per image "
          "| time |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in ranks:
        print(f"| {r['n']} | {r['rss_before_mb']:.1f} MB | {r['peak_before_mb']:.1f} MB | {r['peak_after_mb']:.1f} MB "
              f"| {r['peak_after_mb'] - r['peak_before_mb']:+.1f} MB | {r['unstreamed_mb']:.0f} MB "
              f"| {r['seconds']:.1f} s |")
    print(f"\npeak at {4 * args.n} / peak at {args.n} = {ratio:.3f} (limit {1 + RANK_TOL:.2f}): "
          f"{'PASS' if rank_ok else 'FAIL'}\n")
    if not args.skip_finetune:
        print(f"## fine-tuning ({args.epochs} epochs of train.fit, last.pt/best.pt written each epoch)\n")
        print("| epoch | RSS after epoch | peak so far | train loss | elapsed |")
        print("|---:|---:|---:|---:|---:|")
        for r in result["finetune"]["epochs"]:
            print(f"| {r['epoch']} | {r['rss_mb']:.1f} MB | {r['peak_mb']:.1f} MB | {r['train_loss']:.4f} "
                  f"| {r['seconds']:.1f} s |")
        g = result["finetune"]["growth_after_epoch_2"]
        print(f"\nRSS growth from epoch 2 to {args.epochs}: {100 * g:+.2f}% (limit +{100 * EPOCH_TOL:.0f}%): "
              f"{'PASS' if result['finetune']['ok'] else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
