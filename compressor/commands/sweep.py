"""``sweep``: prune one baseline at several budgets or rates files, fine-tune each, report the tradeoff."""

from __future__ import annotations

import argparse

from compressor.commands import add_common, new_parser
from compressor.commands._options import nonneg_float, nonneg_int, positive_float, positive_int
from compressor.commands.report import add_latency_args, latency_config

EXAMPLES = """\
  # four MAC budgets (fraction of the baseline's MACs kept), 1 fine-tune epoch each
  python -m compressor sweep --checkpoint base.pt --macs 0.7,0.5,0.3,0.2 --epochs 1 --out checkpoints/sweeps/demo
  # the three HRankPlus settings on CIFAR-10; re-running the same command resumes where it stopped
  python -m compressor sweep --checkpoint ../shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt \\
      --rates experiments/vgg16_bn_cifar10/hrankplus_*.yaml --data cifar10 \\
      --data-root ../shared/data/cifar10-jpeg.tar.gz --epochs 30 --out checkpoints/sweeps/vgg_hrankplus
  # each point also exported to int8 (calibrated, checked on the test split; a drop over 1 point is refused)
  python -m compressor sweep --checkpoint base.pt --macs 0.5,0.3 --epochs 1 --int8 --max-drop 1 --out checkpoints/sweeps/q
  # write the (commit-ready) report somewhere else
  python -m compressor sweep --checkpoint base.pt --params 0.5,0.25 --out checkpoints/sweeps/p \\
      --report-out experiments/sweeps/p
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = new_parser(sub, "sweep", "prune one baseline at several points (ranked once), fine-tune each, report",
                   EXAMPLES)
    p.add_argument("--checkpoint", required=True, help="the baseline (unpruned) checkpoint")
    p.add_argument("--model", default=None, help="needed only for a plain (HRank-format) state_dict baseline")
    p.add_argument("--macs", help="comma-separated MAC budgets: fraction of the baseline's MACs kept, e.g. 0.7,0.5")
    p.add_argument("--params", help="comma-separated parameter budgets (fraction kept)")
    p.add_argument("--rates", nargs="+", default=[], help="rates files, one point each")
    p.add_argument("--out", required=True, help="sweep folder (checkpoints, scores, state; resumable)")
    p.add_argument("--report-out", help="report folder (default <out>/report)")
    p.add_argument("--criterion", default="hrank", help="filter criterion (default hrank)")
    p.add_argument("--n-images", type=positive_int, default=768, help="calibration images for ranking (default 768)")
    p.add_argument("--rounding", choices=("keep_floor", "drop_floor"), default=None,
                   help="override every rates file's rounding (default: each file's own; budgets use keep_floor)")
    p.add_argument("--policy", choices=("local", "global"), default="local",
                   help="budget -> rates: local = one uniform rate scaled by bisection (default); global = one "
                        "cross-layer ranking of normalized scores (compressor.pruning.policy)")
    p.add_argument("--tolerance", type=positive_float, default=0.01,
                   help="relative tolerance on a budget (default 0.01; coarse models may need more)")
    p.add_argument("--epochs", type=nonneg_int, default=1, help="fine-tuning epochs per point (default 1)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="fine-tuning learning rate (default: the model's, 0.01; SqueezeNet 0.002)")
    p.add_argument("--warmup-epochs", type=nonneg_float, default=None,
                   help="fine-tuning: linear lr warm-up, in epochs (default: the model's, 0.1)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--no-bn-recalibrate", action="store_true", help="skip BN statistics re-estimation after surgery")
    p.add_argument("--reconstruct", action="store_true",
                   help="refit the layers that read pruned channels by least squares after surgery")
    p.add_argument("--block-refit", type=nonneg_int, default=0, metavar="STEPS",
                   help="then refit each block by STEPS Adam steps against the unpruned block (default 0: off)")
    p.add_argument("--teacher", default=None, help="distil each fine-tune: 'self' (the baseline) or a checkpoint")
    p.add_argument("--no-report", action="store_true", help="prune only; run `report` on the folder later")
    p.add_argument("--no-plots", action="store_true")
    q = p.add_argument_group("int8 (a calibrated int8 ONNX file per point, as `export --int8`)")
    q.add_argument("--int8", action="store_true",
                   help="also export each point to int8 (<point>/pruned.int8.onnx), checked on the test split, "
                        "and add its row (top-1, file size, latency) to the report")
    q.add_argument("--max-drop", type=nonneg_float, default=1.0,
                   help="largest allowed int8 top-1 drop vs float32, in points (default 1.0); a point over it is "
                        "marked refused (no file) and the sweep goes on")
    q.add_argument("--calib-n", type=positive_int, default=256,
                   help="int8 calibration images from the point's training data, unaugmented (default 256)")
    q.add_argument("--calib-method", choices=("minmax", "percentile", "entropy"), default=None,
                   help="activation range calibration (default minmax)")
    add_latency_args(p)
    add_common(p, stats=False)  # the baseline's contract gives the normalisation
    return p


def run(args: argparse.Namespace) -> int:
    from compressor import ReportConfig, TrainConfig
    from compressor.errors import UserError
    from compressor.jobs.sweep import SweepJob, parse_budgets, run_sweep
    from compressor.storage import checkpoint

    try:
        finetune = TrainConfig(epochs=args.epochs, lr=args.lr if args.lr is not None else 0.01,
                               batch_size=args.batch_size, seed=args.seed,
                               warmup_epochs=args.warmup_epochs if args.warmup_epochs is not None else 0.0)
    except ValueError as exc:
        raise UserError(str(exc)) from exc  # the message names the field
    budgets = parse_budgets(args.macs, "macs") + parse_budgets(args.params, "params")
    rcfg = None if args.no_report else ReportConfig(device=args.device, seed=args.seed, latency=latency_config(args),
                                                     plots=not args.no_plots, progress=not args.no_progress)
    extra = {}
    if args.model is not None:
        checkpoint.load(args.checkpoint, model=args.model)  # the file fits the model: one line if not
        extra["model"] = args.model
    job = SweepJob(checkpoint=args.checkpoint, out=args.out, budgets=tuple(budgets), rates=tuple(args.rates),
                   data=args.data, data_root=args.data_root, criterion=args.criterion, n_images=args.n_images,
                   seed=args.seed, rounding=args.rounding, policy=args.policy, tolerance=args.tolerance,
                   bn_recalibrate=not args.no_bn_recalibrate,
                   finetune=finetune, model_lr=args.lr is None, model_warmup=args.warmup_epochs is None,
                   device=args.device, report_out=args.report_out, report=rcfg, progress=not args.no_progress,
                   teacher=args.teacher, reconstruct=args.reconstruct, block_steps=args.block_refit, int8=args.int8, int8_max_drop=args.max_drop,
                   int8_calib_n=args.calib_n, int8_calib_method=args.calib_method, **extra)
    res = run_sweep(job)
    for pt in res["state"]["points"]:
        ach = ", ".join(f"{k} {v:.3f}" for k, v in (pt.get("achieved") or {}).items())
        print(f"  {pt['name']:<16} {pt.get('status', '?'):<6} kept: {ach}  top-1 {pt.get('test_top1', float('nan')):.2f}%")
        if pt.get("int8"):
            print(f"  {'':<16} {int8_line(pt['int8'])}")
    if "report" in res:
        print(res["report"]["markdown"])
        print("report: " + ", ".join(res["report"]["paths"].values()))
    return 0


def int8_line(q: dict) -> str:
    """One line for a point's int8 export: its figures, or why it was refused."""
    figs = (f"int8 top-1 {q['top1_int8']:.2f}% vs float32 {q['top1_float']:.2f}% ({-q['drop']:+.2f} points)"
            if "top1_int8" in q else "int8")
    if q.get("status") == "refused":
        return f"{figs}: REFUSED (limit {q['settings']['max_drop']:g} points), no file"
    return f"{figs}, {q['bytes'] / 1e6:.2f} MB ({q['bytes'] / q['float_bytes']:.2f}× float32): {q.get('path')}"
