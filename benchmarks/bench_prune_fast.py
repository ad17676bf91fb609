"""Time ``prune`` for VGG16-BN on CIFAR-10 from the shared baseline: the old full-evaluation path
against the explicit evaluation budget with a reused baseline (issue 12, target <= 30 s).

    python benchmarks/bench_prune_fast.py                 # needs ../shared/data (skips otherwise)
    python benchmarks/bench_prune_fast.py --eval-n 2000

Steps, each a fresh ``python -m compressor`` process timed from outside (so imports, data loading
and writing the outputs are included):
1. import once: ``eval --save`` writes the baseline as a checkpoint with its data contract and its
   measured test accuracy (also warms the decoded-image cache);
2. ``prune`` as before: baseline and every recovery step measured on the whole test split;
3. ``prune`` with the budget: the recorded baseline reused, the pruned model measured on a fixed
   ``--eval-n`` subset of the test split;
4. ``rank`` alone, to check the ranks of 2 and 3 are bit-identical to the standalone ranking.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compressor", *argv, "--no-progress"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    dt = time.perf_counter() - t
    print(f"  {dt:6.1f} s  {' '.join(argv[:1])} ...{' '.join(argv[-4:])}", flush=True)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-images", type=int, default=640)
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--criterion", default="hrank")
    args = ap.parse_args()
    base, tar = SHARED / "pretrained" / "vgg16_bn_cifar10_jpeg.pt", SHARED / "cifar10-jpeg.tar.gz"
    if not (base.is_file() and tar.is_file()):
        print(f"skipped: {base} or {tar} is missing")
        return 0
    import torch

    rates = ROOT / "experiments" / "vgg16_bn_cifar10" / "hrankplus_58.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        imported = tmp_p / "vgg_imported.pt"
        t_import = timed(["eval", "--checkpoint", str(base), "--model", "vgg16_bn", "--data", "cifar10",
                          "--data-root", str(tar), "--save", str(imported)])
        common = ["prune", "--checkpoint", str(imported), "--rates", str(rates), "--criterion", args.criterion,
                  "--n-images", str(args.n_images)]
        t_full = timed(common + ["--baseline-eval", "measure", "--out", str(tmp_p / "full")])
        t_fast = timed(common + ["--eval-n", str(args.eval_n), "--out", str(tmp_p / "fast")])
        timed(["rank", "--checkpoint", str(imported), "--criterion", args.criterion, "--n-images", str(args.n_images),
               "--out", str(tmp_p / "ranks.pt")])
        load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
        ref = load(tmp_p / "ranks.pt")["scores"][args.criterion]
        same = all(torch.equal(load(tmp_p / run / "scores.pt")["scores"][args.criterion][u], ref[u])
                   for run in ("full", "fast") for u in ref)
    print(f"import once (eval --save, full test split): {t_import:6.1f} s")
    print(f"prune, everything on the full test split:    {t_full:6.1f} s")
    print(f"prune, baseline reused, --eval-n {args.eval_n}:      {t_fast:6.1f} s  "
          f"({t_full / t_fast:.2f}x faster; target <= 30 s: {'met' if t_fast <= 30 else 'missed'})")
    print(f"ranks identical to a standalone `rank` ({args.n_images} images): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
