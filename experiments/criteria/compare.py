"""Compare pruning criteria at equal rates and an equal fine-tuning budget (CPU-sized).

    .venv/bin/python experiments/criteria/compare.py            # the table in RESULTS_criteria.md

Pretrained VGG16-BN on the CIFAR-10 JPEG copy, HRankPlus's rates ``[0.21]*7+[0.75]*5``
(conv 13 kept whole). For every criterion the same steps, seeds and data:

1. scores: all activation criteria share one capture pass over ``--n-calib`` training
   images (no augmentation, seeded subset); taylor takes its own forward+backward pass;
2. plan (top-k per layer, ties by mean activation) and physical surgery (``rebuild``);
3. top-1 on a seeded ``--n-test``-image subset of the test split: right after surgery,
   and after BN re-estimation on 512 training images (``evaluate.recalibrate_bn``);
4. fine-tune the BN-re-estimated model for one pass over ``--ft-images`` augmented
   training images (same images, same order for every criterion: SGD nesterov momentum
   0.9, lr ``--lr`` cosine to 0, wd 5e-4, batch 64), then top-1 on the same test subset.

The fine-tuning loop is a plain 15-line loop here (not ``train.fit``) so the experiment
does not change when the library's trainer gains features.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from compressor.pruning import graph
from compressor import data# noqa: E402
from compressor.storage import checkpoint
from compressor.storage import io
from compressor.pruning import scores as scores_mod
from compressor.pruning import surgery
from compressor.pruning.counting import count  # noqa: E402
from compressor.pruning.criteria.taylor import taylor_scores  # noqa: E402
from compressor.training.evaluation import evaluate, recalibrate_bn  # noqa: E402
from compressor.pruning.plan import make_plan  # noqa: E402
from compressor.pruning.rates import RateSpec, resolve_rates  # noqa: E402

RATES = "[0.21]*7+[0.75]*5"


def finetune(model: torch.nn.Module, ds, n_images: int, seed: int, lr: float, batch: int = 64) -> float:
    """One pass over ``n_images`` augmented training images; returns seconds taken."""
    idx = np.random.default_rng(seed + 7).permutation(len(ds))[:n_images].tolist()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # augmentation draws use the global generator
    dl = torch.utils.data.DataLoader(Subset(ds, idx), batch_size=batch, shuffle=True, generator=g, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = len(dl)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    t0 = time.perf_counter()
    for x, y in dl:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - t0


def jaccard(a: dict, b: dict) -> float:
    inter = sum(len(set(a[u]) & set(b[u])) for u in a)
    union = sum(len(set(a[u]) | set(b[u])) for u in a)
    return inter / union


def table(doc: dict, ref: str) -> str:
    c = doc["config"]
    seeds = c["ft_seeds"].split(",")
    head = (f"| criterion | MACs | params | top-1 right after surgery | + BN re-estimated | fine-tuned "
            f"(seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}) | mean | kept-channel overlap with {ref} |")
    lines = [head, "|---|---|---|---|---|---|---|---|",
             f"| (unpruned baseline) | | | {doc['baseline_test_subset']:.2f} | | | | |"]
    for r in sorted(doc["rows"], key=lambda r: -sum(r["ft"]) / len(r["ft"])):
        ft = " / ".join(f"{v:.2f}" for v in r["ft"])
        lines.append(f"| {r['criterion']} | {r['macs'] / 1e6:.2f}M | {r['params'] / 1e6:.2f}M | {r['raw']:.2f} | "
                     f"{r['bn']:.2f} | {ft} | {sum(r['ft']) / len(r['ft']):.2f} | {r['overlap_vs_' + ref]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT.parent / "shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--criteria", default="hrank,l1,fpgm,chip,random")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--ft-images", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ft-seeds", default="0", help="comma-separated fine-tuning seeds (data order, augmentation)")
    ap.add_argument("--out", default=str(ROOT / "experiments/criteria"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    names = [c.strip() for c in args.criteria.split(",") if c.strip()]
    ft_seeds = [int(s) for s in args.ft_seeds.split(",")]
    out = Path(args.out)

    bundle = data.load("cifar10", args.data_root, seed=args.seed)
    base, _ = checkpoint.load(args.checkpoint, model="vgg16_bn")
    base.eval()
    test = data.loader(data.calibration_subset(bundle.test, args.n_test, args.seed), 250)
    calib = data.loader(data.calibration_subset(bundle.train_eval, args.n_calib, args.seed), 64)
    recal = data.loader(data.calibration_subset(bundle.train_eval, 512, args.seed + 1), 128)
    units = graph.units(base)
    widths = {u.name: u.width for u in units}
    spec = RateSpec(rates=resolve_rates(RATES, list(widths), short_list=12), rounding="keep_floor")

    t0 = time.perf_counter()
    base_acc = evaluate(base, test)["top1"]
    log = {"baseline_test_subset": base_acc, "eval_s": time.perf_counter() - t0}
    print(f"baseline top-1 on {args.n_test} test images: {base_acc:.2f}%", flush=True)

    plain = [n for n in names if n != "taylor"]
    t0 = time.perf_counter()
    sc = scores_mod.compute(base, calib, plain, n_images=args.n_calib, seed=args.seed, options={"seed": args.seed},
                            progress=False)
    log["score_pass_s"] = time.perf_counter() - t0
    per_crit = dict(sc.scores)
    if "taylor" in names:
        t0 = time.perf_counter()
        per_crit["taylor"] = taylor_scores(base, data.loader(data.calibration_subset(bundle.train_eval, args.n_calib,
                                                                                     args.seed), 64),
                                           units, args.n_calib)
        log["taylor_pass_s"] = time.perf_counter() - t0
    print(f"scores for {', '.join(names)} in {log['score_pass_s']:.1f}s (one shared pass)", flush=True)

    rows, plans = [], {}
    for name in names:
        plan = make_plan(per_crit[name], spec, widths, tiebreak=sc.tiebreak, model="vgg16_bn")
        plans[name] = {u: plan.kept(u) for u in widths}
        pruned = surgery.apply(base, plan, method="rebuild").eval()
        row = {"criterion": name, **{k: v for k, v in count(pruned).items()}}
        row["raw"] = evaluate(pruned, test)["top1"]
        recalibrate_bn(pruned, recal, max_images=512)
        row["bn"] = evaluate(pruned, test)["top1"]
        row["ft"], row["ft_s"] = [], 0.0
        for s in ft_seeds:
            m = copy.deepcopy(pruned)
            row["ft_s"] += finetune(m, bundle.train, args.ft_images, s, args.lr)
            row["ft"].append(evaluate(m, test)["top1"])
        rows.append(row)
        print(f"{name:<16} raw {row['raw']:6.2f}  +BN {row['bn']:6.2f}  fine-tuned {row['ft']}  "
              f"({row['ft_s']:.0f}s)", flush=True)

    ref = "hrank" if "hrank" in plans else names[0]
    for row in rows:
        row["overlap_vs_" + ref] = jaccard(plans[row["criterion"]], plans[ref])
    cfg = {k: v for k, v in vars(args).items()}
    doc = {"config": cfg, "rates": RATES, **log, "rows": rows}
    io.write_json(out / "results_criteria.json", doc)
    io.write_text(out / "table_criteria.md", table(doc, ref))
    print(json.dumps({k: v for k, v in log.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
