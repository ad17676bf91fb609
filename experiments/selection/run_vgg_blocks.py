"""Issue 20: the block refit after obs selection + reconstruction on VGG16-BN (CIFAR-10 JPEG copy), no fine-tune.

    .venv/bin/python experiments/selection/run_vgg_blocks.py [--configs chip58,chip79,alloc58,alloc79]
        [--steps 200] [--lr 1e-3]

Starts from the plans the earlier runs recorded: ``chip58``/``chip79`` are obs selection at CHIP's keep counts
(the ``plan`` rows of results_vgg_obs_58/79.json); ``alloc58``/``alloc79`` are policy obs's keep counts
(``obs_counts`` in results_vgg_obs_alloc.json), selected again here by obs on the same images. Then
``reconstruct`` (as before), then ``refit_blocks`` on the same 512 unaugmented training images
(``calibration_subset(train_eval, 512, seed 0)``, 1/8 held out per block). Top-1 on the validation split
(5,000 held-out training images; the baseline was trained on them, so it reads high) and the full 10,000-image
test split after each step. Rows go to results_vgg_blocks.json.
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
from compressor.pruning import surgery  # noqa: E402
from compressor.pruning.counting import count  # noqa: E402
from compressor.pruning.graph import units as units_of  # noqa: E402
from compressor.pruning.plan import Plan  # noqa: E402
from compressor.pruning.reconstruct import keep_from_plan, reconstruct  # noqa: E402
from compressor.pruning.refit_blocks import refit_blocks  # noqa: E402
from compressor.pruning.select_obs import select  # noqa: E402
from compressor.storage import checkpoint, io  # noqa: E402
from compressor.training.evaluation import evaluate  # noqa: E402

HERE = Path(__file__).resolve().parent


def _plan(name: str, base: torch.nn.Module, widths: dict[str, int], xs: list, seed: int) -> tuple[Plan, float]:
    if name.startswith("chip"):
        rows = json.loads((HERE / f"results_vgg_obs_{name[4:]}.json").read_text())["rows"]
        row = next(r for r in rows if r["criterion"] == "obs")
        return Plan(keep={u: tuple(k) for u, k in row["plan"].items()}, widths=widths, model="vgg16_bn"), 0.0
    rows = json.loads((HERE / "results_vgg_obs_alloc.json").read_text())["rows"]
    row = next(r for r in rows if r["rate"] == f"CHIP-{name[5:]}")
    t0 = time.perf_counter()
    plan, _ = select(base, row["obs_counts"], xs, seed=seed, progress=False)
    return plan, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(ROOT.parent / "shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--configs", default="chip79,alloc79,chip58,alloc58")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results_vgg_blocks.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = data.load("cifar10", args.data_root, input_size=32, seed=0)
    base, _ = checkpoint.load(args.checkpoint, model="vgg16_bn")
    base.eval()
    test, val = data.loader(bundle.test, 500), data.loader(bundle.val, 500)
    xs = [b[0] for b in data.loader(data.calibration_subset(bundle.train_eval, args.n_calib, args.seed), 128)]
    widths = {u.name: u.width for u in units_of(base)}
    path = Path(args.out)
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    doc.setdefault("runs", []).append({"command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
                                       "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    for name in args.configs.split(","):
        row = {"config": name, "seed": args.seed, "n_calib": args.n_calib, "steps": args.steps, "lr": args.lr,
               "loadavg_start": os.getloadavg()}
        plan, row["select_s"] = _plan(name, base, widths, xs, args.seed)
        pruned = surgery.apply(base, plan).eval()
        row.update(count(pruned))
        keep = keep_from_plan(base, plan)
        t0 = time.perf_counter()
        reconstruct(base, pruned, xs, keep=keep, seed=args.seed, progress=False)
        row["recon_s"] = time.perf_counter() - t0
        row["recon"] = {"val": evaluate(pruned, val)["top1"], "test": evaluate(pruned, test)["top1"]}
        print(json.dumps(row), flush=True)
        t0 = time.perf_counter()
        rep = refit_blocks(base, pruned, xs, steps=args.steps, lr=args.lr, seed=args.seed, keep=keep, progress=False)
        row["blocks_s"] = time.perf_counter() - t0
        row["blocks"] = [{"name": b.name, "accepted": b.accepted, "held_before": b.error_before,
                          "held_after": b.error_after, "best_step": b.best_step} for b in rep.blocks]
        row["skipped"] = [s[0] for s in rep.skipped]
        row["recon+blocks"] = {"val": evaluate(pruned, val)["top1"], "test": evaluate(pruned, test)["top1"]}
        row["loadavg_end"] = os.getloadavg()
        doc["rows"].append(row)
        io.write_json(path, doc)
        print(json.dumps({k: v for k, v in row.items() if k != "blocks"}), json.dumps(row["blocks"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
