"""``train``: train a baseline model from scratch (also the shared code of ``finetune``)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from compressor.commands import add_common, new_parser
from compressor.commands._options import (EPOCH_FRACTION, check_layer, nonneg_float, nonneg_int, positive_float, positive_int,
                                          unit_interval, unit_interval_open)

if TYPE_CHECKING:
    from torch import nn

    from compressor.data import DataBundle
    from compressor import TrainConfig

EXAMPLES = """\
  python -m compressor train --model vgg16_bn --config experiments/recipes/digits_quick.yaml
  python -m compressor train --model vgg16_bn --data cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz \\
      --config experiments/recipes/hrankplus_cifar.yaml --epochs 200 --lr 0.1 --out checkpoints/vgg16_cifar10
  python -m compressor train --resume checkpoints/vgg16_cifar10/last.pt   # continue exactly, with the run's own options
  torchrun --nproc_per_node=4 -m compressor train --model mobilenet_v2 --data cifar10 --data-root DIR --epochs 30

Per-model defaults (listed at the end) come from the `train:` entries of
compressor/recipes/models.yaml; a run prints the recipe it used. --config and flags override them.
The data contract (classes, input size, normalisation, resize policy) is recorded in every
checkpoint; later commands read their data from it.

outputs (--out folder; refused if it holds another run's files, unless --overwrite): last.pt (every epoch), best.pt (best validation accuracy; the test
split is only evaluated), metrics.jsonl, resolved_config.yaml, summary.json.
"""


def _recipe_lines() -> str:
    """The per-model ``train:`` defaults in use, for --help."""
    from compressor.jobs.options import recipe_table

    return recipe_table()


def add_train_args(p: argparse.ArgumentParser, lr: float) -> None:
    """Options shared by ``train`` and ``finetune``; every one can also be a recipe key."""
    B = argparse.BooleanOptionalAction
    p.add_argument("--config", metavar="YAML", help="recipe file (experiments/recipes/*.yaml); flags override it")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in --out (a folder with other files is refused)")
    p.add_argument("--resume", metavar="LAST_PT",
                   help="continue a run from its last.pt (model, optimizer, schedule, epoch) with the run's own options; "
                        "flags typed with it override them")
    p.add_argument("--epochs", type=nonneg_int, default=5)
    p.add_argument("--lr", type=positive_float, default=lr)
    p.add_argument("--batch-size", type=positive_int, default=128, help="per process")
    p.add_argument("--momentum", type=unit_interval_open, default=0.9, help="SGD momentum, in [0, 1)")
    p.add_argument("--nesterov", action=B, default=True, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=nonneg_float, default=5e-4)
    p.add_argument("--no-decay-bn-bias", action="store_true", help="no weight decay on BN parameters and biases")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "multistep", "onecycle", "constant"))
    p.add_argument("--milestones", type=nonneg_int, nargs="+", default=[], help="multistep: epochs where lr *= gamma")
    p.add_argument("--gamma", type=positive_float, default=0.1, help="multistep: lr factor (> 0)")
    p.add_argument("--warmup-epochs", type=nonneg_float, default=0.0, help="linear warm-up length")
    p.add_argument("--label-smoothing", type=unit_interval_open, default=0.0, help="in [0, 1)")
    p.add_argument("--teacher", metavar="CKPT", help="knowledge distillation from this checkpoint's logits")
    p.add_argument("--kd-temperature", type=positive_float, default=4.0)
    p.add_argument("--kd-alpha", type=unit_interval, default=0.5, help="weight of the KD term (1-alpha on cross-entropy)")
    p.add_argument("--amp", action=B, default=True, help="mixed precision on GPU (bf16, else fp16 + GradScaler)")
    p.add_argument("--channels-last", action=B, default=True, help="channels_last memory format on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--workers", type=nonneg_int, default=0, help="DataLoader worker processes")
    p.add_argument("--eval-every", type=EPOCH_FRACTION, default=1.0, metavar="FRACTION",
                   help="evaluate the validation split every this fraction of an epoch, in (0, 1] (also before the "
                        "first step and at every epoch end): metrics.jsonl rows and recovery_curve.png")
    p.add_argument("--val-size", type=nonneg_int, default=None,
                   help="images held out from train for selection (default: 10%% digits, 5000 CIFAR)")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from compressor.jobs import options as recipe

    p = new_parser(sub, "train", "train a baseline model", EXAMPLES + _recipe_lines())
    p.add_argument("--model", default=None, help="registered model name (required unless --resume)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--input-size", type=positive_int, default=None,
                   help="train at N px (models with global pooling, e.g. the CIFAR MobileNets/SqueezeNets/ResNets at "
                        "64); recorded in the checkpoint; default: the model's own")
    add_train_args(p, lr=0.05)
    add_common(p)
    return recipe.defer_defaults(p)


def train_config(args: argparse.Namespace) -> TrainConfig:
    from compressor import TrainConfig
    from compressor.errors import UserError

    try:
        return TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
            weight_decay=args.weight_decay, no_decay_bn_bias=args.no_decay_bn_bias, schedule=args.schedule,
            milestones=tuple(args.milestones or ()), gamma=args.gamma, warmup_epochs=args.warmup_epochs,
            label_smoothing=args.label_smoothing, seed=args.seed, workers=args.workers, amp=args.amp,
            channels_last=args.channels_last, kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha,
            compile=args.compile, eval_every=args.eval_every)
    except ValueError as exc:
        raise UserError(str(exc), source=args.config) from exc


def _fmt(r: dict[str, Any], epochs: int) -> str:
    val = f" val {r['val_acc']:.2f}%" if "val_acc" in r else ""
    return (f"epoch {r['epoch']}/{epochs}: lr {r['lr']:.4g} loss {r['train_loss']:.4f} "
            f"train {r['train_acc']:.2f}%{val} ({r['img_per_s']:.0f} img/s)")


def load_data(args: argparse.Namespace, input_size: Any, model: nn.Module, ck: Mapping[str, Any] | None = None,
              source: str | None = None, probe: bool = False) -> DataBundle:
    """The run's data: the typed options, else the model's data contract (which it then carries)."""
    from compressor.commands import _data

    return _data.load(args, model, ck=ck, source=source, input_size=input_size, val_size=args.val_size, probe=probe)


# --- resume: the run's own options (compressor.training.train_run holds the run itself) ------------

def resolve_args(args: argparse.Namespace) -> tuple[argparse.Namespace, nn.Module | None, dict[str, Any] | None]:
    """Resolve the options; with ``--resume``: defaults < the run's saved options < recipe < flags typed.

    Returns the namespace and, when resuming, the model and checkpoint loaded from the last.pt.
    """
    from compressor.storage import checkpoint
    from compressor.jobs import options as recipe
    from compressor.jobs import train_run
    from compressor.errors import UserError

    actions = getattr(args, recipe._ACTIONS)  # noqa: SLF001 - the option table defer_defaults kept
    if getattr(args, "config", None):
        check_layer(recipe.read(args.config), actions, str(args.config))  # YAML numbers skip argparse's types
    first = recipe.resolve(args)
    if not first.resume:
        if getattr(first, "model", None) and not hasattr(first, "checkpoint"):  # train, not finetune
            return _with_model_recipe(args, first.model), None, None
        return first, None, None
    src = str(first.resume)
    net, ck = checkpoint.load(src, model=getattr(first, "model", None))
    ts = (ck.get("extra") or {}).get("train_state")
    if not isinstance(ts, dict) or "optimizer" not in ts:
        raise UserError("has no training state to resume from (use a last.pt written by train/finetune)", source=src)
    saved = train_run.saved_options(src, ck)
    check_layer(saved, actions, src)
    resolved = recipe.resolve(args, saved=saved, saved_source=src)
    changed = [f"{k} {saved[k]!r} -> {getattr(resolved, k)!r}" for k in train_run.EXACT_KEYS
               if k in saved and train_run.plain(saved[k]) != train_run.plain(getattr(resolved, k, None))]
    if changed:
        warnings.warn(f"{src}: resuming with changed settings ({', '.join(changed)}); the run will not repeat "
                      "an uninterrupted one", stacklevel=2)
    return resolved, net, ck


def _with_model_recipe(args: argparse.Namespace, arch: str) -> argparse.Namespace:
    """defaults < the model's ``train:`` values (recipes/models.yaml) < --config < flags; says which."""
    from compressor import model_recipe
    from compressor.jobs import options as recipe

    rec = model_recipe(arch)
    values = dict(rec.get("train") or {})
    resolved = recipe.resolve(args, saved=values, saved_source=rec["source"])
    given = set(vars(args)) | set(recipe.read(args.config) if getattr(args, "config", None) else {})
    used = {k: v for k, v in values.items() if k not in given}
    if used:
        print(f"train recipe {rec['source']}: " + ", ".join(f"{k} {v}" for k, v in used.items())
              + " (--config or flags override)")
    return resolved


def run_training(net: nn.Module, bundle: DataBundle, args: argparse.Namespace, out: Path, *,
                 ck: Mapping[str, Any] | None = None, source: str | None = None) -> int:
    """The resolved options as a ``train_run.TrainRun``, run by the library."""
    from compressor.jobs import train_run

    spec = train_run.TrainRun(
        config=train_config(args), command="finetune" if hasattr(args, "checkpoint") else "train",
        device=args.device, data=args.data, data_root=args.data_root, val_size=args.val_size, teacher=args.teacher,
        resume=str(args.resume) if args.resume else None, recipe=args.config,
        overwrite=bool(getattr(args, "overwrite", False)), progress=not args.no_progress, options=vars(args),
        log=lambda r: print(_fmt(r, args.epochs), flush=True))
    return train_run.run(net, bundle, spec, out, ck=ck, source=source)


def run(args: argparse.Namespace) -> int:
    import torch

    from compressor.data import contract
    from compressor.storage import io
    from compressor.errors import UserError
    from compressor import build_model

    args, net, ck = resolve_args(args)
    if args.resume:
        out = io.check_writable(Path(args.out or Path(args.resume).parent))
        return run_training(net, load_data(args, net.input_size, net, ck, args.resume), args, out, ck=ck)
    if not args.model:
        raise UserError("--model is required (as a flag or a recipe key) unless --resume is given", field="model")
    out = io.check_writable(Path(args.out or f"checkpoints/{args.model}_{args.data or 'digits'}"))
    size = {"input_size": args.input_size} if getattr(args, "input_size", None) else {}
    probe = build_model(args.model, num_classes=args.num_classes if args.num_classes is not None else 10, **size)
    bundle = load_data(args, probe.input_size, probe, probe=True)
    torch.manual_seed(args.seed)  # the initial weights are a function of --seed too
    net = build_model(args.model, num_classes=args.num_classes if args.num_classes is not None else bundle.num_classes,
                    **size)
    contract.attach(net, contract.of(probe))  # the data contract this run sets
    return run_training(net, bundle, args, out)
