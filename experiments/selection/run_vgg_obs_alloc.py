"""Issue 20 part 2: policy obs (allocation by the selection's error) at the MACs of CHIP's hand-set rates, VGG16-BN.

    .venv/bin/python experiments/selection/run_vgg_obs_alloc.py [--rates CHIP-58,CHIP-79] [--n-calib 512]

For each CHIP rate list, its MACs fraction (counted on the model pruned at those keep counts, keep_floor) becomes
the target of ``policy: obs``: the error curves are computed once on the unpruned network (every unit down to
min_keep 0.1, ``policy_obs.curves``), the greedy allocates each target, then ``select`` chooses the channels at
those counts and ``reconstruct`` refits (the same path as ``prune --criterion obs --reconstruct`` with
``policy: obs``). 512 unaugmented training images (``calibration_subset``, seed 0) serve the curves, the
selection and the refit. Top-1 on the full 10,000-image test split, no fine-tune. Rows go to --out (JSON).
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
from compressor.pruning import graph, policy_obs, surgery  # noqa: E402
from compressor.pruning.counting import count  # noqa: E402
from compressor.pruning.rates import resolve_rates  # noqa: E402
from compressor.pruning.reconstruct import keep_from_plan, reconstruct  # noqa: E402
from compressor.pruning.select_obs import select  # noqa: E402
from compressor.pruning.size import SizeModel  # noqa: E402
from compressor.storage import checkpoint, io  # noqa: E402
from compressor.training.evaluation import evaluate  # noqa: E402

RATES = {"CHIP-58": "[0.21]*7+[0.75]*5", "CHIP-79": "[0.45]*7+[0.78]*5"}
OUT = Path(__file__).resolve().parent


def chip_counts(widths: dict[str, int], rate: str) -> dict[str, int]:
    """CHIP's keep counts (keep_floor: floor of width × (1 − rate), at least 1)."""
    rates = resolve_rates(RATES[rate], list(widths), short_list=12)
    return {u: max(1, int(w * (1 - rates.get(u, 0.0)) + 1e-9)) for u, w in widths.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(ROOT.parent / "shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--rates", default="CHIP-58,CHIP-79")
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--min-keep", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT / "results_vgg_obs_alloc.json"))
    args = ap.parse_args()
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    bundle = data.load("cifar10", args.data_root, input_size=32, seed=0)
    base, _ = checkpoint.load(args.checkpoint, model="vgg16_bn")
    base.eval()
    test = data.loader(bundle.test, 500)
    xs = [b[0] for b in data.loader(data.calibration_subset(bundle.train_eval, args.n_calib, args.seed), 128)]
    units = graph.units(base)
    widths = {u.name: u.width for u in units}
    sizer = SizeModel(base, graph.discovery(base))
    full = sizer.count({})
    doc = {"command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(), "seed": args.seed,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "loadavg_start": os.getloadavg(),
           "rows": []}
    t0 = time.perf_counter()
    curve = policy_obs.curves(base, xs, units, args.min_keep, seed=args.seed)
    doc["curves_s"] = time.perf_counter() - t0
    doc["curves"] = curve
    print(f"curves in {doc['curves_s']:.0f} s", flush=True)
    for rate in args.rates.split(","):
        chip = chip_counts(widths, rate)
        target = sizer.count(chip)["macs"] / full["macs"]
        counts = policy_obs.allocate(curve, widths, sizer.count, {"macs": target})
        row = {"rate": rate, "target_macs": target, "chip_counts": chip,
               "obs_counts": {u: counts.get(u, w) for u, w in widths.items()}, "loadavg_start": os.getloadavg()}
        t1 = time.perf_counter()
        plan, rep = select(base, counts, xs, seed=args.seed, progress=False)
        row["select_s"] = time.perf_counter() - t1
        pruned = surgery.apply(base, plan).eval()
        t2 = time.perf_counter()
        reconstruct(base, pruned, xs, keep=keep_from_plan(base, plan), seed=args.seed, progress=False)
        row["recon_s"] = time.perf_counter() - t2
        row.update(count(pruned))
        row["top1"] = evaluate(pruned, test)["top1"]
        row["loadavg_end"] = os.getloadavg()
        doc["rows"].append(row)
        io.write_json(Path(args.out), doc)
        print(json.dumps({k: v for k, v in row.items() if k not in ("chip_counts", "obs_counts")}), flush=True)
        print("  chip:", list(chip.values()), "\n  obs: ", list(row["obs_counts"].values()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
