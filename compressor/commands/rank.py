"""``rank``: score every prunable filter and write a reusable scores file."""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor.commands import add_common, new_parser
from compressor.commands._options import nonneg_float, positive_int

EXAMPLES = """\
  python -m compressor rank --model vgg16_bn --checkpoint base.pt --data cifar10 \\
      --data-root ../shared/data/cifar10-jpeg.tar.gz --n-images 768 --out scores.pt
  python -m compressor rank --model vgg16_bn --checkpoint base.pt --criterion hrank,l1 --export-hrank rank_conv/
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = new_parser(sub, "rank", "score filters (one forward pass for all activation criteria)", EXAMPLES)
    p.add_argument("--model", default=None, help="needed only for plain (HRank-format) state_dicts")
    p.add_argument("--checkpoint", required=True, help="trained model (compressor or HRank format)")
    p.add_argument("--criterion", default="hrank", help="one or more, comma-separated (default hrank)")
    p.add_argument("--n-images", type=positive_int, default=768)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--hrank-compat", action="store_true", help="HRank's original relucfg rank points")
    p.add_argument("--rank-rtol", type=nonneg_float, default=None,
                   help="hrank: relative singular-value tolerance (default eps32 * max(H, W))")
    p.add_argument("--rank-atol", type=nonneg_float, default=0.0, help="hrank: absolute tolerance")
    p.add_argument("--out", default=None, help="scores file (default checkpoints/<model>_scores.pt)")
    p.add_argument("--export-hrank", metavar="DIR", help="also write HRank rank_conv{k}.npy files")
    add_common(p)
    return p


def criterion_names(text: str) -> list[str]:
    """``hrank,l1`` -> ``["hrank", "l1"]``: each a registered criterion, at least one, no repeats."""
    from compressor.pruning import criteria
    from compressor.errors import UserError

    names = list(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    if not names:
        raise UserError(f"no criterion named in {text!r}; valid: {', '.join(criteria.list_criteria())}",
                        field="criterion")
    for n in names:
        criteria.get(n)
    return names


def run(args: argparse.Namespace) -> int:
    """Works under ``torchrun`` too: each process ranks a shard, the sums are all-reduced."""
    from compressor import data
    from compressor.storage import checkpoint
    from compressor.training import distributed
    from compressor.storage import io
    from compressor.pruning import scores
    from compressor.commands import _data

    names = criterion_names(args.criterion)
    out = Path(args.out or f"checkpoints/{args.model or Path(args.checkpoint).stem}_scores.pt")
    io.check_writable(out.parent)  # fail before the pass, not after it
    ctx = distributed.init(args.device)
    device = ctx.device
    ok = False
    try:
        model, ck = checkpoint.load(args.checkpoint, model=args.model)
        bundle = _data.load(args, model, ck=ck, source=args.checkpoint)
        calib = data.calibration_subset(bundle.train_eval, args.n_images, args.seed)
        sc = distributed.compute_scores(
            model.to(device), calib, names, batch_size=args.batch_size, seed=args.seed, compat=args.hrank_compat,
            device=device, options={"rtol": args.rank_rtol, "atol": args.rank_atol}, progress=not args.no_progress,
            extra_meta={"data": bundle.name, "augmentation": "none", "checkpoint": args.checkpoint}, ctx=ctx)

        def write() -> None:  # rank 0; the other ranks learn whether it failed
            sc.save(out)
            print(f"scores ({', '.join(names)}, {sc.meta['n_images']} images, seed {args.seed}, "
                  f"{ctx.world_size} process(es)) written to {out}")
            if args.export_hrank:
                paths = scores.export_hrank(sc, "hrank" if "hrank" in names else names[0], model, args.export_hrank)
                print(f"HRank rank files: {len(paths)} written to {args.export_hrank}")

        distributed.run_on_main(write, ctx)
        ok = True
    finally:
        distributed.shutdown(barrier=ok)  # unwinding from an error: no barrier (the peers failed too)
    return 0
