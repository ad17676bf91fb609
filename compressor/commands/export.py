"""``export``: ONNX export of a (pruned) checkpoint, verified against onnxruntime."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compressor.commands import new_parser
from compressor.commands._options import OPSET_MIN, nonneg_float, nonneg_int, opset_int, seed_int

EXAMPLES = """\
  python -m compressor export --checkpoint checkpoints/vgg16_bn_digits_demo/pruned.pt --out pruned.onnx
  # stricter tolerance, more real images, machine-readable result
  python -m compressor export --checkpoint pruned.pt --out pruned.onnx --atol 1e-5 --n-real 256 --json
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
    return p


def run(args: argparse.Namespace) -> int:
    from compressor import checkpoint, io
    from compressor.onnx_export import export

    net, _ = checkpoint.load(args.checkpoint, model=args.model)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".onnx")
    io.check_writable(out.parent)
    res = export(net, out, opset=args.opset, atol=args.atol, n_real=args.n_real, seed=args.seed, force=args.force)
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
