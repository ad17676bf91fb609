"""``export``: ONNX export of a (pruned) checkpoint, verified against onnxruntime."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compressor.commands import new_parser
from compressor.commands._options import OPSET_MIN, nonneg_float, nonneg_int, opset_int, positive_int, seed_int

EXAMPLES = """\
  python -m compressor export --checkpoint checkpoints/vgg16_bn_digits_demo/pruned.pt --out pruned.onnx
  # stricter tolerance, more real images, machine-readable result
  python -m compressor export --checkpoint pruned.pt --out pruned.onnx --atol 1e-5 --n-real 256 --json
  # calibrated int8 (QDQ), refused (exit 3) if top-1 drops more than 0.5 points below float32
  python -m compressor export --checkpoint pruned.pt --int8 --out pruned.int8.onnx --max-drop 0.5
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = new_parser(sub, "export", "export a checkpoint to ONNX (dynamic batch), verified with onnxruntime", EXAMPLES)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", help="needed only for plain (HRank-format) state_dicts")
    p.add_argument("--out", help="ONNX file to write (default: the checkpoint's path with .onnx)")
    p.add_argument("--opset", type=opset_int, default=17,
                   help=f"ONNX opset (default 17; {OPSET_MIN} .. the newest torch writes)")
    p.add_argument("--atol", type=nonneg_float, default=1e-4, help="largest allowed |torch - onnxruntime| logit difference")
    p.add_argument("--n-real", type=nonneg_int, default=64, help="test images of the checkpoint's own data used in the check (0: random only)")
    p.add_argument("--force", action="store_true", help="write the file even if the check fails")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the random check inputs")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    q = p.add_argument_group("int8 (static post-training quantization with onnxruntime)")
    q.add_argument("--int8", action="store_true",
                   help="write a calibrated int8 QDQ model (per-channel weights), checked on the model's test data")
    q.add_argument("--max-drop", type=nonneg_float, default=1.0,
                   help="largest allowed top-1 drop of int8 vs float32, in points (default 1.0; exit 3 above it)")
    q.add_argument("--calib-n", type=positive_int, default=256,
                   help="calibration images from the model's own training data, unaugmented (default 256)")
    q.add_argument("--calib-method", choices=("minmax", "percentile", "entropy"), default=None,
                   help="activation range calibration (default minmax, the best measured here)")
    q.add_argument("--n-test", type=positive_int, default=None,
                   help="test images for the int8 vs float32 top-1 check (default: the whole test split)")
    return p


def run(args: argparse.Namespace) -> int:
    import compressor
    from compressor.storage import checkpoint
    from compressor.storage import io

    net, _ = checkpoint.load(args.checkpoint, model=args.model)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".onnx")
    io.check_writable(out.parent)
    if args.int8:
        return _run_int8(net, out, args)
    res = compressor.export(net, out, opset=args.opset, atol=args.atol, n_real=args.n_real, seed=args.seed,
                            force=args.force)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        for c in res.checks:
            flag = "ok" if c.ok(res.atol) else "FAIL"
            print(f"  {flag:<4} {c.name:<28} shape {list(c.shape)}  max|diff| {c.max_abs_diff:.2e}  "
                  f"top-1 agree {100 * c.argmax_agree:.1f}%")
        state = f"written to {res.path}" if res.path else "NOT written"
        print(f"ONNX opset {res.opset}, {res.bytes / 1e6:.3f} MB, dynamic batch, tolerance {res.atol:g}: {state}")
    if not res.ok:
        print(f"error: onnxruntime outputs differ from torch by more than {res.atol:g}"
              + ("" if args.force else " (use --force to write anyway)"), file=__import__("sys").stderr)
        return 1
    return 0


def _run_int8(net, out: Path, args: argparse.Namespace) -> int:
    import compressor

    if args.out is None:
        out = out.with_suffix(".int8.onnx")
    res = compressor.export(net, out, int8=True, n_calib=args.calib_n, calib_method=args.calib_method, seed=args.seed,
                            max_drop=args.max_drop, n_test=args.n_test, opset=args.opset,
                            atol=args.atol)  # a drop over --max-drop raises DropTooLarge: one line, exit 3
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    print(f"  calibration: {res.calibration_images} images ({res.calibration_source}, seed {res.seed}), "
          f"{res.method}; BN folded into Gemm: {res.bn_folded}, BN left: {res.bn_left}")
    print(f"  top-1 on {res.n_test} {res.test_data} images: float32 {res.top1_float:.2f}%  int8 {res.top1_int8:.2f}%  "
          f"(drop {res.drop:+.2f} points, limit {res.max_drop:g}; top-1 agree {100 * res.agree:.1f}%)")
    print(f"int8 ONNX (QDQ) opset {args.opset}, {res.bytes / 1e6:.3f} MB ({res.bytes / res.float_bytes:.2f}x of "
          f"float32 {res.float_bytes / 1e6:.3f} MB), dynamic batch: written to {res.path}")
    return 0
