"""``report``: accuracy / size / latency table (markdown, CSV, JSON) and PNG plots over checkpoints."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from compressor.commands import add_common, new_parser
from compressor.commands._options import nonneg_int, positive_int

if TYPE_CHECKING:
    from compressor import LatencyConfig

EXAMPLES = """\
  # a prune run folder (pruned.pt, baseline.pt, scores.pt, plan.json) and another pruned checkpoint
  python -m compressor report checkpoints/vgg16_bn_digits_demo other/pruned.pt --out reports/demo
  # every run under checkpoints/ (quote globs), a sweep folder, on CIFAR-10, 20 timed runs
  python -m compressor report 'checkpoints/*' experiments/sweeps/sq11 --data cifar10 \\
      --data-root ../shared/data/cifar10-jpeg.tar.gz --repeats 20 --out reports/all
  # sizes and latency only (no evaluation), 1 CPU thread
  python -m compressor report base.pt pruned.pt --no-eval --threads 1 --out reports/fast
  # a CIFAR ResNet or torchvision prune run: its baseline.pt is matched by architecture and plan widths
  python -m compressor report checkpoints/resnet20_run --out reports/r20
  # checkpoints of your own model (package.module:builder): name the code to allow importing it
  python -m compressor report runs/mynet --model mypkg.nets:small_cnn --out reports/mynet
  # recovery curves of fine-tune runs overlaid (each folder's metrics.jsonl; label = folder name; the
  # baseline's accuracy, when a run's checkpoint records it, is a horizontal reference line)
  python -m compressor report --curves ft_lr0.01 ft_lr0.002 ft_kd --out reports/curves.png
"""


def add_latency_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("latency")
    g.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes to time (default 1,64)")
    g.add_argument("--repeats", type=positive_int, default=10, help="timed runs per model and batch size (median reported)")
    g.add_argument("--warmup", type=nonneg_int, default=3, help="untimed warm-up runs (default 3)")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads for timing (default: torch's current)")
    g.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    g.add_argument("--no-cuda-latency", action="store_true", help="time on CPU only even when a GPU is present")


def latency_config(args: argparse.Namespace) -> LatencyConfig | None:
    from compressor import LatencyConfig
    from compressor.errors import UserError

    if args.no_latency:
        return None
    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
        return LatencyConfig(batch_sizes=sizes, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                             cuda=not args.no_cuda_latency)
    except ValueError as exc:
        raise UserError(f"bad latency settings: {exc}", field="batch-sizes/repeats/warmup/threads") from exc


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = new_parser(sub, "report", "compare checkpoints: accuracy, params/MACs, file size, latency, plots", EXAMPLES)
    p.add_argument("inputs", nargs="*", help="checkpoints, prune run folders or sweep folders (globs allowed)")
    p.add_argument("--curves", nargs="+", metavar="RUN_DIR", default=None,
                   help="instead: overlay the recovery curves (metrics.jsonl) of these train/finetune output "
                        "folders in one PNG and print start/best/final validation top-1")
    p.add_argument("--out", required=True,
                   help="output folder for report.md/.csv/.json and PNGs (--curves: a .png file, or a folder "
                        "for recovery_curves.png)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="evaluation batch size")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation (no accuracy columns or accuracy plots)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    p.add_argument("--model", action="append", default=[], metavar="MODULE:BUILDER",
                   help="allow loading checkpoints built by this user code (package.module:builder; repeatable); "
                        "registered and torchvision: models need nothing")
    add_latency_args(p)
    add_common(p, stats=False)  # each checkpoint is evaluated with its own contract's normalisation
    return p


def run(args: argparse.Namespace) -> int:
    import compressor
    from compressor.errors import UserError

    if args.curves:
        return run_curves(args)
    if not args.inputs:
        raise UserError("give checkpoints, prune run folders or sweep folders (or --curves RUN_DIR ...)",
                        field="inputs")
    res = compressor.report(args.inputs, args.out, data=args.data, data_root=args.data_root, device=args.device,
                            batch_size=args.batch_size, seed=args.seed, evaluate=not args.no_eval,
                            latency=latency_config(args), plots=not args.no_plots, progress=not args.no_progress,
                            models=args.model)
    print(res["markdown"])
    print(f"written to {args.out}: " + ", ".join(list(res["paths"].values()) + res["plots"]))
    return 0


def run_curves(args: argparse.Namespace) -> int:
    import compressor
    from compressor.errors import UserError

    if args.inputs:
        raise UserError(f"--curves overlays run folders; checkpoints given as well ({args.inputs[0]} ...): "
                        "report them in a separate call", field="curves")
    res = compressor.recovery_curves(args.curves, args.out)
    print(res["table"], end="")
    for r in res["rows"]:
        if r.get("baseline"):
            print(f"{r['run']}: {r['baseline']['label']}, recorded in {r['baseline']['source']} "
                  "(drawn as a reference line)")
    print(f"written to {res['png']}")
    return 0
