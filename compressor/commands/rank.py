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
    import compressor

    return compressor.check_criteria(text)


def run(args: argparse.Namespace) -> int:
    """Works under ``torchrun`` too: each process ranks a shard, the sums are all-reduced."""
    from compressor.commands import _data
    from compressor.jobs.rank import RankJob, run_rank

    out = Path(args.out or f"checkpoints/{args.model or Path(args.checkpoint).stem}_scores.pt")
    job = RankJob(checkpoint=args.checkpoint, criteria=tuple(criterion_names(args.criterion)), out=out,
                  model=args.model, n_images=args.n_images, batch_size=args.batch_size, seed=args.seed,
                  hrank_compat=args.hrank_compat, rank_options={"rtol": args.rank_rtol, "atol": args.rank_atol},
                  export_hrank=args.export_hrank, device=args.device, progress=not args.no_progress)
    run_rank(job, lambda model, ck: _data.load(args, model, ck=ck, source=args.checkpoint))
    return 0
