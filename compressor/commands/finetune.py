"""``finetune``: fine-tune a pruned checkpoint; the architecture comes from its cfg."""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor.commands import add_common, new_parser
from compressor.commands.train import add_train_args, train_and_save

EXAMPLES = """\
  python -m compressor finetune --checkpoint checkpoints/vgg16_bn_digits_demo/pruned.pt --epochs 3
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = new_parser(sub, "finetune", "fine-tune a (pruned) checkpoint", EXAMPLES)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default=None, help="output checkpoint (default <checkpoint>_ft.pt)")
    add_train_args(p, lr=0.01)
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    from compressor import checkpoint, data
    from compressor.errors import UserError

    net, ck = checkpoint.load(args.checkpoint)
    bundle = data.load(args.data, args.data_root, input_size=net.input_size, seed=args.seed)
    if bundle.num_classes != net.num_classes:
        raise UserError(f"the data has {bundle.num_classes} classes, the checkpoint {net.num_classes}",
                        source=args.checkpoint, field="num_classes")
    src = Path(args.checkpoint)
    out = Path(args.out or src.with_name(src.stem + "_ft.pt"))
    return train_and_save(net, bundle, args, out, rates=ck.get("rates"), plan=ck.get("plan"))
