"""Issue 20: hrank, l1 and random under policy obs's allocation vs CHIP's hand-set counts, VGG16-BN, no fine-tune.

    .venv/bin/python experiments/selection/run_vgg_alloc_criteria.py [--criteria hrank,l1,random]

Keep counts: CHIP's (``chip_counts`` in results_vgg_obs_alloc.json) or policy obs's (``obs_counts``, allocated
on the same MACs by the obs error curves). Each criterion keeps its own top channels at those counts (plan
from the scores, tie-break as ``make_plan``), then ``reconstruct`` refits on 512 unaugmented training images
(``calibration_subset(train_eval, 512, seed 0)``). hrank ranks on 768 training images (seed 0, as ``prune``
does by default). Top-1 on the full 10,000-image test split. Rows go to results_vgg_alloc_criteria.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from compressor import data  # noqa: E402
from compressor.pruning import scores as scores_mod, surgery  # noqa: E402
from compressor.pruning.counting import count  # noqa: E402
from compressor.pruning.graph import balanced_keep, units as units_of  # noqa: E402
from compressor.pruning.plan import Plan, rank_order  # noqa: E402
from compressor.pruning.reconstruct import keep_from_plan, reconstruct  # noqa: E402
from compressor.storage import checkpoint, io  # noqa: E402
from compressor.training.evaluation import evaluate  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(ROOT.parent / "shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--criteria", default="hrank,l1,random")
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--n-rank", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results_vgg_alloc_criteria.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = data.load("cifar10", args.data_root, input_size=32, seed=0)
    base, _ = checkpoint.load(args.checkpoint, model="vgg16_bn")
    base.eval()
    test = data.loader(bundle.test, 500)
    xs = [b[0] for b in data.loader(data.calibration_subset(bundle.train_eval, args.n_calib, args.seed), 128)]
    rank_loader = data.loader(data.calibration_subset(bundle.train_eval, args.n_rank, args.seed), 128)
    widths = {u.name: u.width for u in units_of(base)}
    crits = args.criteria.split(",")
    t0 = time.perf_counter()
    sc = scores_mod.compute(base, rank_loader, crits, n_images=args.n_rank, seed=args.seed, progress=False)
    rank_s = time.perf_counter() - t0
    alloc = json.loads((HERE / "results_vgg_obs_alloc.json").read_text())["rows"]
    path = Path(args.out)
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    doc.setdefault("runs", []).append({"command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
                                       "rank_s": rank_s,
                                       "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    for row_a in alloc:
        for counts_name in ("chip_counts", "obs_counts"):
            counts = row_a[counts_name]
            for crit in crits:
                s, tb = sc.scores[crit], sc.tiebreak
                keep = {u: balanced_keep(rank_order(s[u], tb.get(u) if tb else None), k, widths[u], 1)
                        for u, k in counts.items() if k < widths[u]}
                plan = Plan(keep=keep, widths=widths, model="vgg16_bn")
                pruned = surgery.apply(base, plan).eval()
                t1 = time.perf_counter()
                reconstruct(base, pruned, xs, keep=keep_from_plan(base, plan), seed=args.seed, progress=False)
                row = {"rate": row_a["rate"], "counts": counts_name.split("_")[0], "criterion": crit,
                       "seed": args.seed, "n_calib": args.n_calib, **count(pruned),
                       "recon_s": time.perf_counter() - t1, "top1": evaluate(pruned, test)["top1"],
                       "loadavg": os.getloadavg()}
                doc["rows"].append(row)
                io.write_json(path, doc)
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
