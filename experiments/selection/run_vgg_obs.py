"""obs selection + reconstruction vs l1 + reconstruction on VGG16-BN (CIFAR-10 JPEG copy), no fine-tune.

    .venv/bin/python experiments/selection/run_vgg_obs.py [--rates CHIP-58,CHIP-79] [--criteria obs,l1]

Keep counts: CHIP rates ``[0.21]*7+[0.75]*5`` / ``[0.45]*7+[0.78]*5``, keep_floor (as
experiments/recovery/run_vgg.py); both criteria keep the same counts per unit. Calibration:
512 unaugmented training images (``calibration_subset``, seed 0), the same images for the
selection and the refit. Top-1 on the full 10,000-image test split, and on the 5,000 held-out training
images (val: where settings such as --positions are compared). Rows are appended to
results_vgg_obs.json after each configuration.
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

from compressor import data# noqa: E402
from compressor.storage import checkpoint
from compressor.storage import io
from compressor.pruning import scores as scores_mod
from compressor.pruning import surgery
from compressor.pruning.counting import count  # noqa: E402
from compressor.pruning.graph import units as units_of  # noqa: E402
from compressor.training.evaluation import evaluate  # noqa: E402
from compressor.pruning.plan import make_plan  # noqa: E402
from compressor.pruning.rates import RateSpec, resolve_rates  # noqa: E402
from compressor.pruning.reconstruct import keep_from_plan, reconstruct  # noqa: E402
from compressor.pruning.select_obs import select  # noqa: E402

RATES = {"CHIP-58": "[0.21]*7+[0.75]*5", "CHIP-79": "[0.45]*7+[0.78]*5"}
OUT = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(ROOT.parent / "shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--rates", default="CHIP-58,CHIP-79")
    ap.add_argument("--criteria", default="obs,l1")
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--positions", type=int, default=32)
    ap.add_argument("--chunk", type=float, default=1 / 32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT / "results_vgg_obs.json"))
    args = ap.parse_args()
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    bundle = data.load("cifar10", args.data_root, input_size=32, seed=0)
    base, _ = checkpoint.load(args.checkpoint, model="vgg16_bn")
    base.eval()
    test, val = data.loader(bundle.test, 500), data.loader(bundle.val, 500)
    calib_ds = data.calibration_subset(bundle.train_eval, args.n_calib, args.seed)
    xs = [b[0] for b in data.loader(calib_ds, 128)]
    widths = {u.name: u.width for u in units_of(base)}
    l1 = scores_mod.compute(base, [], ["l1"], n_images=0, seed=args.seed, progress=False)
    path = Path(args.out)
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    doc.setdefault("runs", []).append({"command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
                                       "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                       "loadavg_start": os.getloadavg()})
    for rate in args.rates.split(","):
        spec = RateSpec(rates=resolve_rates(RATES[rate], list(widths), short_list=12), rounding="keep_floor")
        l1_plan = make_plan(l1.scores["l1"], spec, widths, tiebreak=l1.tiebreak, model="vgg16_bn")
        for crit in args.criteria.split(","):
            row = {"rate": rate, "criterion": crit, "n_calib": args.n_calib, "positions": args.positions,
                   "seed": args.seed,
                   "loadavg_start": os.getloadavg()}
            t0 = time.perf_counter()
            if crit == "obs":
                plan, rep = select(base, l1_plan, xs, positions=args.positions, chunk=args.chunk, seed=args.seed,
                                   progress=False)
                row["select_s"] = time.perf_counter() - t0
                row["obs"] = rep.to_dict()
                row["same_as_l1"] = {u: len(set(plan.kept(u)) & set(l1_plan.kept(u))) for u in plan.keep}
            else:
                plan = l1_plan
                row["select_s"] = time.perf_counter() - t0
            pruned = surgery.apply(base, plan).eval()
            assert all(len(plan.kept(u)) == len(l1_plan.kept(u)) for u in widths)
            t1 = time.perf_counter()
            rec = reconstruct(base, pruned, xs, keep=keep_from_plan(base, plan), seed=args.seed, progress=False)
            row["recon_s"] = time.perf_counter() - t1
            row["total_s"] = time.perf_counter() - t0
            row.update(count(pruned))
            row["recon_error_after"] = {f.name: f.error_after for f in rec.layers}
            row["top1"] = evaluate(pruned, test)["top1"]
            row["val_top1"] = evaluate(pruned, val)["top1"]  # settings are compared here, never on test
            row["loadavg_end"] = os.getloadavg()
            row["plan"] = {u: list(plan.kept(u)) for u in plan.keep}
            doc["rows"].append(row)
            io.write_json(path, doc)
            print(json.dumps({k: v for k, v in row.items() if k not in ("obs", "plan", "recon_error_after")}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
