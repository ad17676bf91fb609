"""``list-layers``: the prunable units of a model, to write per-layer rates by name."""

from __future__ import annotations

import argparse

from compressor.pruning.graph import units as units_of
from compressor.commands import new_parser

EXAMPLES = """\
  python -m compressor list-layers --model vgg16_bn
  python -m compressor list-layers            # list the registered models
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = new_parser(sub, "list-layers", "list registered models, or a model's prunable layers and rank points", EXAMPLES)
    p.add_argument("--model", help="registered model name")
    return p


def run(args: argparse.Namespace) -> int:
    from compressor.models import get_model, list_models

    if not args.model:
        print("\n".join(list_models()))
        return 0
    m = get_model(args.model)
    print(f"# {args.model}: {len(units_of(m))} prunable units (rates list order)")
    print("| # | layer (rates key) | channels | rank point | coupled convs |")
    print("|---|---|---|---|---|")
    for i, u in enumerate(units_of(m)):
        print(f"| {i} | {u.name} | {u.width} | {', '.join(u.rank_points)} | {', '.join(u.convs[1:]) or '-'} |")
    return 0
