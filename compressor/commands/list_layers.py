"""``list-layers``: the prunable units of a model, to write per-layer rates by name."""

from __future__ import annotations

import argparse

from compressor.commands import new_parser

EXAMPLES = """\
  python -m compressor list-layers vgg16_bn
  python -m compressor list-layers --model torchvision:resnet18 --input-size 64
  python -m compressor list-layers            # list the registered models
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = new_parser(sub, "list-layers", "list registered models, or a model's prunable layers and rank points", EXAMPLES)
    p.add_argument("name", nargs="?", help="model name (same as --model)")
    p.add_argument("--model", help="registered name, torchvision:<name> or package.module:builder")
    p.add_argument("--input-size", type=int, default=None, help="input size (torchvision:/module: models, and registered models with global pooling)")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                   help="list residual groups as prunable (default: the model's)")
    return p


def run(args: argparse.Namespace) -> int:
    import compressor

    name = args.model or args.name
    if not name:
        print("\n".join(compressor.list_models()))
        return 0
    kw = {"input_size": args.input_size} if args.input_size else {}
    d = compressor.describe(compressor.build_model(name, **kw), residual=args.residual)
    size = d.input_size if isinstance(d.input_size, int) else "x".join(map(str, d.input_size))
    print(f"# {name}: {len(d.units)} prunable units (rates list order); {d.macs / 1e6:.2f}M MACs and "
          f"{d.params / 1e6:.3f}M params at {size} px")
    print("# MACs / params: what follows the unit's channels (its convs, their norms, the next layers' inputs)")
    print("| # | layer (rates key) | channels | kind | MACs | params | rank point | coupled convs |")
    print("|---|---|---|---|---|---|---|---|")
    for i, u in enumerate(d.units):
        print(f"| {i} | {u.name} | {u.width} | {u.kind} | {u.macs / 1e6:.2f}M | {u.params / 1e3:.1f}k | "
              f"{', '.join(u.rank_points)} | {', '.join(u.coupled) or '-'} |")
    for n, kind in d.skipped.items():
        print(f"# not pruned by default: {n} ({kind}{'; --residual prunes it' if kind == 'residual' else ''})")
    for n, why in d.refused.items():
        print(f"# refused: {n}: {why}")
    return 0
