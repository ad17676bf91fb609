"""``sensitivity``: prune each layer alone at several rates; CSV, plot and suggested rates."""

from __future__ import annotations

import argparse

from compressor.commands import add_common, new_parser
from compressor.commands._options import nonneg_float, nonneg_int, positive_int, unit_interval

EXAMPLES = """\
  python -m compressor sensitivity --model vgg16_bn \\
      --checkpoint ../shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt --data cifar10 \\
      --data-root ../shared/data/cifar10-jpeg.tar.gz --criterion l1 --n-eval 1000 --target macs=0.42
  # a quick look at three layers, BN statistics re-estimated after each cut
  python -m compressor sensitivity --model vgg16_bn --checkpoint base.pt --layers features.conv0,features.conv10 \\
      --rates 0.25,0.5,0.75 --bn-recalibrate 256 --out sens/
  # any model the engine prunes: a CIFAR ResNet, a torchvision classifier (the checkpoint names it)
  python -m compressor sensitivity --checkpoint checkpoints/resnet20_run/baseline.pt --rates 0.3,0.6 --target macs=0.5
"""


def _target(text: str | None) -> dict[str, float] | None:
    from compressor.errors import UserError

    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, _, val = part.partition("=")
        try:
            v = float(val)
        except ValueError:
            raise UserError(f"expected macs=F or params=F, got {part!r}", field="target") from None
        if key.strip() not in ("macs", "params") or not 0.0 < v <= 1.0:
            raise UserError(f"expected macs=F or params=F with F in (0, 1], got {part!r}", field="target")
        out[key.strip()] = v
    return out


def _rates(text: str) -> list[float]:
    from compressor.errors import UserError

    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got {text!r}", field="rates") from None
    if not vals or any(not 0.0 < v < 1.0 for v in vals):
        raise UserError(f"rates must be in (0, 1), got {text!r}", field="rates")
    return sorted(set(vals))


def add_parser(sub) -> argparse.ArgumentParser:
    p = new_parser(sub, "sensitivity",
                   "prune each layer alone at several rates and record the accuracy drop (no fine-tuning)",
                   EXAMPLES)
    p.add_argument("--model", default=None,
                   help="registered name, torchvision:<name> or package.module:builder; not needed with a "
                        "--checkpoint that records it (a plain state_dict needs it)")
    p.add_argument("--checkpoint", required=True, help="trained model (compressor, HRank or torchvision format)")
    p.add_argument("--criterion", default="l1", help="which filters go at each rate (default l1; any criterion)")
    p.add_argument("--rates", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="comma-separated rates to try")
    p.add_argument("--layers", default=None, help="comma-separated unit names (default: every prunable unit)")
    p.add_argument("--n-eval", type=positive_int, default=1000, help="held-out (val split) images per evaluation")
    p.add_argument("--n-images", type=positive_int, default=256, help="calibration images for activation criteria")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--bn-recalibrate", type=nonneg_int, default=0, metavar="N",
                   help="re-estimate BN statistics on N training images after each cut (default 0: off)")
    p.add_argument("--tolerance", type=nonneg_float, default=1.0, help="largest accepted drop per layer, in points")
    p.add_argument("--target", default=None, help="budget for the suggestion, e.g. macs=0.42 or params=0.2")
    p.add_argument("--min-keep", type=unit_interval, default=0.1, help="per-layer fraction always kept (suggestion)")
    p.add_argument("--out", default=None, help="output folder (default checkpoints/<model>_sensitivity)")
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    from compressor.commands import _data
    from compressor.jobs.sensitivity import SensitivityJob, run_sensitivity

    target, rates = _target(args.target), _rates(args.rates)
    layers = tuple(x.strip() for x in args.layers.split(",")) if args.layers else None
    job = SensitivityJob(checkpoint=args.checkpoint, rates=tuple(rates), model=args.model, criterion=args.criterion,
                         layers=layers, n_eval=args.n_eval, n_images=args.n_images, batch_size=args.batch_size,
                         bn_recalibrate=args.bn_recalibrate, tolerance=args.tolerance, target=target,
                         min_keep=args.min_keep, seed=args.seed, out=args.out, device=args.device,
                         progress=not args.no_progress)
    res = run_sensitivity(job, lambda model, ck: _data.load(args, model, ck=ck, source=args.checkpoint))
    result, tol = res["result"], res["tolerated"]
    print(f"baseline top-1 on {args.n_eval} val images: {result.baseline_top1:.2f}%")
    for unit in result.units():
        drops = " ".join(f"{d:5.1f}" for _, d in result.curve(unit))
        print(f"  {unit:<28} drop at {','.join(f'{r:g}' for r in rates)}: {drops}   tolerated {tol[unit]:g}")
    a = res["suggestion"]["achieved"]
    print(f"suggested rates keep {a['macs']:.2%} of MACs, {a['params']:.2%} of params"
          + (f" (target {target})" if target else ""))
    for k, v in res["paths"].items():
        print(f"  {k:<8} {v}")
    return 0
