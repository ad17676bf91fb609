"""``finetune``: fine-tune a pruned checkpoint; the architecture comes from its cfg."""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor.commands import add_common, new_parser
from compressor.commands.train import add_train_args, load_data, resolve_args, run_training

EXAMPLES = """\
  python -m compressor finetune --checkpoint checkpoints/vgg16_bn_digits_demo/pruned.pt --epochs 3
  python -m compressor finetune --checkpoint pruned.pt --data cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz \\
      --config experiments/recipes/chip_cifar.yaml --teacher baseline.pt --kd-alpha 0.5 --out ft/
  python -m compressor finetune --resume ft/last.pt          # continue an interrupted run exactly (its own options)
  python -m compressor finetune --resume ft/last.pt --epochs 30   # ... or extend it
  torchrun --nproc_per_node=4 -m compressor finetune --checkpoint pruned.pt --config experiments/recipes/hrankplus_cifar.yaml \\
      --data cifar10 --data-root DIR --batch-size 64      # 4 x 64 = the recipe's global batch of 256

outputs (--out folder, default <checkpoint>_ft/): last.pt, best.pt (best validation accuracy at an epoch end),
metrics.jsonl (every validation evaluation: before the first step, i.e. the pruned accuracy, and at every
epoch end), recovery_curve.png (validation top-1 vs epochs), resolved_config.yaml, summary.json (test
accuracy, never used for selection). Overlay several runs: python -m compressor report --curves DIR ... --out c.png
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from compressor.jobs import options as recipe

    p = new_parser(sub, "finetune", "fine-tune a (pruned) checkpoint", EXAMPLES)
    p.add_argument("--checkpoint", default=None, help="pruned (or any) checkpoint; required unless --resume")
    p.add_argument("--model", default=None, help="needed only for plain (HRank-format) state_dicts")
    add_train_args(p, lr=0.01)
    add_common(p)
    return recipe.defer_defaults(p)


def run(args: argparse.Namespace) -> int:
    from compressor.storage import checkpoint
    from compressor.storage import io
    from compressor.jobs import options as recipe
    from compressor.errors import UserError

    typed = {k for k in ("lr", "warmup_epochs") if k in vars(args)}
    args, net, ck = resolve_args(args)  # --resume: the run's own options under the flags typed
    if args.resume:
        out = io.check_writable(Path(args.out or Path(args.resume).parent))
        return run_training(net, load_data(args, net.input_size, net, ck, args.resume), args, out, ck=ck)
    if not args.checkpoint:
        raise UserError("--checkpoint is required (as a flag or a recipe key) unless --resume is given",
                        field="checkpoint")
    out = io.check_writable(Path(args.out or Path(args.checkpoint).with_name(Path(args.checkpoint).stem + "_ft")))
    net, ck = checkpoint.load(args.checkpoint, model=args.model)
    given = typed | (set(recipe.read(args.config)) if args.config else set())
    if not {"lr", "warmup_epochs"} <= given:  # the model's fine-tune defaults fill what neither gave
        from compressor import model_recipe

        rec = model_recipe(net.arch)
        if "lr" not in given:
            args.lr = float(rec["finetune_lr"])
            print(f"fine-tune lr {args.lr:g} ({rec['source']}; --lr overrides)")
        if "warmup_epochs" not in given:
            args.warmup_epochs = float(rec["finetune_warmup_epochs"])
            print(f"fine-tune warm-up {args.warmup_epochs:g} epochs ({rec['source']}; --warmup-epochs overrides)")
    return run_training(net, load_data(args, net.input_size, net, ck, str(args.checkpoint)), args, out, ck=ck,
                        source=str(args.checkpoint))
