"""``sensitivity``: prune each layer alone at several rates; CSV, plot and suggested rates."""

from __future__ import annotations

import argparse
from pathlib import Path

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


def _safe(name: str) -> str:
    """A model reference as a folder name (``torchvision:resnet18`` -> ``torchvision_resnet18``)."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


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

    import compressor
    from compressor import data
    from compressor.storage import checkpoint
    from compressor.pruning import criteria
    from compressor.storage import io
    from compressor.pruning import sensitivity_scan as sens
    from compressor.commands import _data
    from compressor.errors import UserError
    from compressor.training.evaluation import resolve_device

    device = resolve_device(args.device)
    target, rates = _target(args.target), _rates(args.rates)
    criteria.get(args.criterion)
    model, ck = checkpoint.load(args.checkpoint, model=args.model)
    model = model.to(device).eval()
    name = args.model or ck["model"]
    units = list(sens.unit_names(model))  # the engine's units: any model, the rates-file keys
    layers = [x.strip() for x in args.layers.split(",")] if args.layers else None
    for layer in layers or []:
        if layer not in units:
            raise UserError(f"unknown layer {layer!r}; valid: {', '.join(units)}", field="layers")
    bundle = _data.load(args, model, ck=ck, source=args.checkpoint)
    data.check_classes(bundle, model.num_classes, field="data")
    if not 0 < args.n_eval <= len(bundle.val):
        raise UserError(f"--n-eval must be in [1, {len(bundle.val)}] (size of the val split)", field="n-eval")
    out = io.check_writable(Path(args.out or f"checkpoints/{_safe(name)}_sensitivity"))

    calib = data.calibration_subset(bundle.train_eval, args.n_images, args.seed)
    scores = compressor.rank(model, data.loader(calib, args.batch_size, device=device), [args.criterion],
                             n_images=args.n_images, seed=args.seed, device=device, progress=not args.no_progress)
    held_out = data.calibration_subset(bundle.val, args.n_eval, args.seed)
    recal = None
    if args.bn_recalibrate > 0:
        recal = data.loader(data.calibration_subset(bundle.train_eval, args.bn_recalibrate, args.seed + 1),
                            args.batch_size, device=device)
    result = compressor.sensitivity(model, data.loader(held_out, 256, device=device), scores=scores,
                                    criterion=args.criterion, rates=rates, units=layers, device=device,
                                    recal_loader=recal, recal_images=max(1, args.bn_recalibrate),
                                    progress=not args.no_progress)
    result.meta.update({"model": name, "checkpoint": args.checkpoint, "criterion": args.criterion,
                        "n_eval": args.n_eval, "eval_split": "val", "seed": args.seed, "data": bundle.name})
    spec, info = sens.suggest(result, model, args.tolerance, target=target, min_keep=args.min_keep)
    header = (f"suggested by: python -m compressor sensitivity --model {name} --criterion {args.criterion} "
              f"--tolerance {args.tolerance}" + (f" --target {args.target}" if args.target else ""))
    paths = {
        "csv": sens.write_csv(result, out / "sensitivity.csv"),
        "plot": sens.plot(result, out / "sensitivity.png",
                          f"{name}: per-layer sensitivity ({args.criterion}, {args.n_eval} val images)"),
        "rates": io.write_text(out / "suggested_rates.yaml", sens.suggestion_yaml(spec, info, name, header)),
        "summary": io.write_json(out / "sensitivity.json", {"baseline_top1": result.baseline_top1, **result.meta,
                                                            "suggestion": {k: v for k, v in info.items()}}),
    }
    print(f"baseline top-1 on {args.n_eval} val images: {result.baseline_top1:.2f}%")
    tol = sens.tolerated_rates(result, args.tolerance)
    for unit in result.units():
        drops = " ".join(f"{d:5.1f}" for _, d in result.curve(unit))
        print(f"  {unit:<28} drop at {','.join(f'{r:g}' for r in rates)}: {drops}   tolerated {tol[unit]:g}")
    a = info["achieved"]
    print(f"suggested rates keep {a['macs']:.2%} of MACs, {a['params']:.2%} of params"
          + (f" (target {target})" if target else ""))
    for k, v in paths.items():
        print(f"  {k:<8} {v}")
    return 0
