"""Issue 20 part 3: does a block-wise refit after the layer-wise reconstruction pay for its time on ResNet-56?

    .venv/bin/python experiments/resnet56_cifar10/run_block_refit.py [--runs obs_recon_128,l1_recon_128]
        [--settings 200:1e-4,200:1e-3]

Starts from the pruned, reconstructed checkpoints of run_chip48_jpeg.sh (CHIP-48 keep counts,
128 calibration images, no fine-tune) and the JPEG-adapted baseline as the original. The block
refit (``compressor.pruning.refit_blocks``) uses the same 128 calibration images the
reconstruction used (``calibration_subset(train_eval, 128, seed 0 + 2)``), 1/8 of them held out
for choosing each block's weights. Settings are compared on the validation split (5,000
training images held out); the full 10,000-image test split is reported for each, not used to
choose. Rows are appended to results_block_refit.json.
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

import compressor  # noqa: E402
from compressor import data  # noqa: E402
from compressor.pruning.plan import Plan  # noqa: E402
from compressor.pruning.reconstruct_kept import keep_from_plan  # noqa: E402
from compressor.pruning.refit_blocks import refit_blocks  # noqa: E402

OUT = Path(__file__).resolve().parent
RUNS = ROOT / "checkpoints" / "resnet56_jpeg"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="obs_recon_128,l1_recon_128")
    ap.add_argument("--settings", default="200:1e-4,200:1e-3", help="steps:lr,...")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--out", default=str(OUT / "results_block_refit.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = compressor.load(RUNS / "baseline_ft" / "best.pt").eval()
    bundle = data.load("cifar10", args.data_root, input_size=32, seed=0, stats=data.model_stats(base))
    calib = data.loader(data.calibration_subset(bundle.train_eval, args.n_calib, args.seed + 2), 64)
    val, test = data.loader(bundle.val, 500), data.loader(bundle.test, 500)
    path = Path(args.out)
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    doc.setdefault("runs", []).append({"command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
                                       "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    for run in args.runs.split(","):
        keep = keep_from_plan(base, Plan.load(RUNS / run / "plan.json"), torch.zeros(1, 3, 32, 32))
        start = compressor.load(RUNS / run / "pruned.pt").eval()
        row0 = {"run": run, "setting": "none", "val": compressor.evaluate(start, val)["top1"],
                "test": compressor.evaluate(start, test)["top1"]}
        print(json.dumps(row0), flush=True)
        doc["rows"].append(row0)
        for setting in args.settings.split(","):
            steps, lr = setting.split(":")
            small = compressor.load(RUNS / run / "pruned.pt").eval()
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            rep = refit_blocks(base, small, calib, steps=int(steps), lr=float(lr), seed=args.seed, keep=keep,
                               progress=False)
            row = {"run": run, "setting": setting, "seconds": round(time.perf_counter() - t0, 1),
                   "loadavg_start": load0, "blocks": len(rep.blocks),
                   "accepted": sum(b.accepted for b in rep.blocks),
                   "held_error_before": sum(b.error_before for b in rep.blocks) / max(1, len(rep.blocks)),
                   "held_error_after": sum(b.error_after for b in rep.blocks) / max(1, len(rep.blocks)),
                   "val": compressor.evaluate(small, val)["top1"], "test": compressor.evaluate(small, test)["top1"],
                   "seed": args.seed, "n_calib": args.n_calib,
                   "skipped": [s[0] for s in rep.skipped]}
            print(json.dumps(row), flush=True)
            doc["rows"].append(row)
            path.write_text(json.dumps(doc, indent=1))
    path.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
