"""``train``: train a baseline model from scratch (also the shared code of ``finetune``)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from compressor.commands import add_common, new_parser
from compressor.commands._options import (check_layer, nonneg_float, nonneg_int, positive_float, positive_int,
                                          unit_interval, unit_interval_open)

if TYPE_CHECKING:
    from torch import nn

    from compressor.data import DataBundle
    from compressor.train import TrainConfig

EXAMPLES = """\
  python -m compressor train --model vgg16_bn --config experiments/recipes/digits_quick.yaml
  python -m compressor train --model vgg16_bn --data cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz \\
      --config experiments/recipes/hrankplus_cifar.yaml --epochs 200 --lr 0.1 --out checkpoints/vgg16_cifar10
  python -m compressor train --resume checkpoints/vgg16_cifar10/last.pt   # continue exactly, with the run's own options
  torchrun --nproc_per_node=4 -m compressor train --model mobilenet_v2 --data cifar10 --data-root DIR --epochs 30

outputs (--out folder): last.pt (every epoch), best.pt (best validation accuracy; the test
split is only evaluated), metrics.jsonl, resolved_config.yaml, summary.json.
"""


def add_train_args(p: argparse.ArgumentParser, lr: float) -> None:
    """Options shared by ``train`` and ``finetune``; every one can also be a recipe key."""
    B = argparse.BooleanOptionalAction
    p.add_argument("--config", metavar="YAML", help="recipe file (experiments/recipes/*.yaml); flags override it")
    p.add_argument("--out", default=None, help="output folder")
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
    p.add_argument("--val-size", type=nonneg_int, default=None,
                   help="images held out from train for selection (default: 10%% digits, 5000 CIFAR)")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from compressor import recipe

    p = new_parser(sub, "train", "train a baseline model", EXAMPLES)
    p.add_argument("--model", default=None, help="registered model name (required unless --resume)")
    p.add_argument("--num-classes", type=int, default=None)
    add_train_args(p, lr=0.05)
    add_common(p)
    return recipe.defer_defaults(p)


def train_config(args: argparse.Namespace) -> TrainConfig:
    from compressor.errors import UserError
    from compressor.train import TrainConfig

    try:
        return TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
            weight_decay=args.weight_decay, no_decay_bn_bias=args.no_decay_bn_bias, schedule=args.schedule,
            milestones=tuple(args.milestones or ()), gamma=args.gamma, warmup_epochs=args.warmup_epochs,
            label_smoothing=args.label_smoothing, seed=args.seed, workers=args.workers, amp=args.amp,
            channels_last=args.channels_last, kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha,
            compile=args.compile)
    except ValueError as exc:
        raise UserError(str(exc), source=args.config) from exc


def _fmt(r: dict[str, Any], epochs: int) -> str:
    val = f" val {r['val_acc']:.2f}%" if "val_acc" in r else ""
    return (f"epoch {r['epoch']}/{epochs}: lr {r['lr']:.4g} loss {r['train_loss']:.4f} "
            f"train {r['train_acc']:.2f}%{val} ({r['img_per_s']:.0f} img/s)")


def load_data(args: argparse.Namespace, input_size: int, model: nn.Module | None = None) -> DataBundle:
    from compressor import data

    return data.load(args.data, args.data_root, input_size=input_size, val_size=args.val_size, seed=args.seed,
                     download=args.download, stats=data.model_stats(model) if model is not None else None)


def load_teacher(path: str, student_arch: str) -> nn.Module:
    """A compressor checkpoint of any architecture, or a plain (HRank-style) state_dict of the student's."""
    from compressor import checkpoint

    plain = checkpoint.read(path).get("format") != checkpoint.CKPT_FORMAT
    return checkpoint.load(path, model=student_arch if plain else None)[0]


# --- resume: the run's own options ------------------------------------------------------

RESOLVED = "resolved_config.yaml"
# About this invocation, not the run: never taken from a saved run, ignored when comparing runs.
NOT_RESTORED = ("config", "resume", "out", "no_progress")
# Options outside TrainConfig that a resumed run must keep to repeat an uninterrupted one
# (fit() itself checks the TrainConfig ones against the checkpoint's training state).
EXACT_KEYS = ("data", "data_root", "val_size", "teacher")


def saved_options(resume: str, ck: Mapping[str, Any]) -> dict[str, Any]:
    """The options the run in ``resume`` was made with.

    ``<resume dir>/resolved_config.yaml`` first; the checkpoint's own training config and data
    provenance override it (they are what the saved state was trained with).
    """
    from compressor import recipe
    from compressor.errors import UserError

    out: dict[str, Any] = {}
    path = Path(resume).parent / RESOLVED
    if path.is_file():
        try:
            out.update(recipe.read(path))
        except UserError as exc:
            warnings.warn(f"{exc}; resuming with the settings stored in {resume}", stacklevel=2)
    ts = ((ck.get("extra") or {}).get("train_state") or {})
    out.update(ts.get("config") or {})
    prov = ck.get("provenance") or {}
    out.update({k: prov[k] for k in EXACT_KEYS if k in prov})
    for k in NOT_RESTORED:
        out.pop(k, None)
    return out


def resolve_args(args: argparse.Namespace) -> tuple[argparse.Namespace, nn.Module | None, dict[str, Any] | None]:
    """Resolve the options; with ``--resume``: defaults < the run's saved options < recipe < flags typed.

    Returns the namespace and, when resuming, the model and checkpoint loaded from the last.pt.
    """
    from compressor import checkpoint, recipe
    from compressor.errors import UserError

    actions = getattr(args, recipe._ACTIONS)  # noqa: SLF001 - the option table defer_defaults kept
    if getattr(args, "config", None):
        check_layer(recipe.read(args.config), actions, str(args.config))  # YAML numbers skip argparse's types
    first = recipe.resolve(args)
    if not first.resume:
        return first, None, None
    src = str(first.resume)
    net, ck = checkpoint.load(src, model=getattr(first, "model", None))
    ts = (ck.get("extra") or {}).get("train_state")
    if not isinstance(ts, dict) or "optimizer" not in ts:
        raise UserError("has no training state to resume from (use a last.pt written by train/finetune)", source=src)
    saved = saved_options(src, ck)
    check_layer(saved, actions, src)
    resolved = recipe.resolve(args, saved=saved, saved_source=src)
    changed = [f"{k} {saved[k]!r} -> {getattr(resolved, k)!r}" for k in EXACT_KEYS
               if k in saved and _plain(saved[k]) != _plain(getattr(resolved, k, None))]
    if changed:
        warnings.warn(f"{src}: resuming with changed settings ({', '.join(changed)}); the run will not repeat "
                      "an uninterrupted one", stacklevel=2)
    return resolved, net, ck


def _plain(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v


def _options(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _plain(v) for k, v in doc.items() if k not in NOT_RESTORED}


def write_resolved(out: Path, args: argparse.Namespace, header: str) -> None:
    """``resolved_config.yaml``: the options of the run; a resume with the same options leaves it as it is."""
    import yaml

    from compressor import io, recipe

    path = out / RESOLVED
    text = recipe.to_yaml(argparse.Namespace(**{**vars(args), "out": str(out)}), header=header)
    if args.resume and path.is_file():
        try:
            old = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            old = None
        new = _options(yaml.safe_load(text))
        if isinstance(old, dict):
            before = _options(old)
            if before == new:
                return
            changed = sorted(k for k in set(new) | set(before) if before.get(k) != new.get(k))
            text = f"# resumed from {args.resume} with changed options: {', '.join(changed)}\n" + text
    io.write_text(path, text)


# --- what a fine-tune keeps of its source ----------------------------------------------------

def source_record(path: str, ck: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(provenance["source"], metrics)`` a fine-tune of checkpoint ``ck`` (read from ``path``) carries.

    The source entry names the file and keeps how it was pruned (criterion, BN re-estimation,
    rates, and the source's own source); the metrics keep the prune metrics under ``prune`` and
    the fine-tune epochs the weights already had under ``finetune_history`` (this run's epochs
    are in each checkpoint's training state).
    """
    sprov = ck.get("provenance") or {}
    m = ck.get("metrics") or {}
    ts = (ck.get("extra") or {}).get("train_state") or {}
    up = sprov.get("source") if isinstance(sprov.get("source"), Mapping) else {}
    src: dict[str, Any] = {"path": str(path), "model": ck.get("model"), "data": sprov.get("data"),
                           "command": sprov.get("command"), "time": sprov.get("time")}
    for key in ("criterion", "bn_recalibrated", "n_images"):
        val = sprov.get(key, up.get(key))
        if val is not None:
            src[key] = val
    if ck.get("rates"):
        src["rates"] = ck["rates"]
    if sprov.get("source") is not None:
        src["source"] = sprov["source"]
    tuned_before = "finetune_history" in m or sprov.get("source") is not None
    metrics: dict[str, Any] = {"finetune_history": list(m.get("finetune_history") or [])
                               + (list(ts.get("history") or []) if tuned_before else [])}
    prune = m.get("prune")
    if not isinstance(prune, Mapping) and ck.get("plan") and not ts:  # a prune run's output: its metrics
        prune = {k: v for k, v in m.items() if k != "finetune_history"}
    if prune:
        metrics["prune"] = dict(prune)
    return src, metrics


def run_training(net: nn.Module, bundle: DataBundle, args: argparse.Namespace, out: Path, *,
                 ck: Mapping[str, Any] | None = None, source: str | None = None) -> int:
    """Fit ``net`` with the resolved ``args``; rank 0 writes ``out``; then evaluate on test.

    ``ck``: the checkpoint ``net`` came from: the ``--resume`` last.pt (its carried provenance,
    metrics and training state are kept) or, with ``source`` its path, a checkpoint to fine-tune.
    """
    from compressor import checkpoint, data, distributed
    from compressor.train import config_dict, fit

    ck = ck or {}
    if args.resume:
        sprov = ck.get("provenance") or {}
        src_rec = sprov.get("source")
        carried = {k: v for k, v in (ck.get("metrics") or {}).items() if k in ("finetune_history", "prune")}
        recipe_used = args.config or sprov.get("recipe")
    elif source is not None:
        src_rec, carried = source_record(source, ck)
        recipe_used = args.config
    else:
        src_rec, carried, recipe_used = None, {}, args.config
    ctx = distributed.init(args.device)
    ok = False
    try:
        device = ctx.device
        data.check_classes(bundle, net.num_classes, source=source or args.resume)
        teacher = load_teacher(args.teacher, net.arch) if args.teacher else None
        cfg = train_config(args)
        extra = {"resumed_from": str(args.resume)} if args.resume else {}
        prov = checkpoint.provenance(seed=args.seed, data=args.data,
                                     data_root=str(args.data_root) if args.data_root is not None else None,
                                     val_size=args.val_size, train=config_dict(cfg), recipe=recipe_used,
                                     processes=ctx.world_size, teacher=args.teacher, source=src_rec, **extra)
        distributed.run_on_main(lambda: write_resolved(out, args, header=f"resolved options of: {prov['command']}"),
                                ctx)  # rank 0 writes; a failure there stops every rank, at once
        meta = {"rates": ck.get("rates"), "plan": ck.get("plan"), "prov": prov, "metrics": carried}
        history = fit(net, bundle, cfg, device, progress=not args.no_progress and ctx.is_main,
                      log=lambda r: print(_fmt(r, cfg.epochs), flush=True), teacher=teacher, out_dir=out,
                      resume=ck if args.resume else None, resume_source=args.resume, ckpt_meta=meta, ctx=ctx)
        rc = distributed.run_on_main(lambda: _report(net, bundle, out, history, device), ctx)
        ok = True
        return int(rc or 0)
    finally:
        distributed.shutdown(barrier=ok)  # unwinding from an error: the peers stopped at the same point


def _report(net: nn.Module, bundle: DataBundle, out: Path, history: list[dict[str, Any]], device: Any) -> int:
    """Test accuracy of best.pt (selected on val) and of the last epoch; never used to select."""
    from compressor import checkpoint, data, io
    from compressor.evaluate import evaluate

    test_loader = data.loader(bundle.test, 256, device=device)
    summary: dict[str, Any] = {"epochs": len(history), "last": {"val_acc": history[-1].get("val_acc") if history else None}}
    summary["last"]["test"] = evaluate(net.to(device), test_loader, device)
    best = out / "best.pt"
    if best.exists():
        bnet, obj = checkpoint.load(best)  # obj is the file's dict: written back with the test result
        summary["best"] = {"epoch": obj["metrics"].get("epoch"), "val_acc": obj["metrics"].get("val_acc"),
                           "test": evaluate(bnet.to(device), test_loader, device)}
        obj["metrics"]["test"] = summary["best"]["test"]
        io.save_torch(best, obj)
    io.write_json(out / "summary.json", summary)
    line = f"test top-1: last epoch {summary['last']['test']['top1']:.2f}%"
    if "best" in summary:
        line += (f", best.pt (epoch {summary['best']['epoch']}, val {summary['best']['val_acc']:.2f}%) "
                 f"{summary['best']['test']['top1']:.2f}%")
    print(line + " (test is never used for selection)")
    print(f"outputs in {out}: " + ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from compressor import io
    from compressor.errors import UserError
    from compressor.models import get_model

    args, net, ck = resolve_args(args)
    if args.resume:
        out = io.check_writable(Path(args.out or Path(args.resume).parent))
        return run_training(net, load_data(args, net.input_size, net), args, out, ck=ck)
    if not args.model:
        raise UserError("--model is required (as a flag or a recipe key) unless --resume is given", field="model")
    out = io.check_writable(Path(args.out or f"checkpoints/{args.model}_{args.data}"))
    probe = get_model(args.model, num_classes=args.num_classes if args.num_classes is not None else 10)
    bundle = load_data(args, probe.input_size, probe)
    torch.manual_seed(args.seed)  # the initial weights are a function of --seed too
    net = get_model(args.model, num_classes=args.num_classes if args.num_classes is not None else bundle.num_classes)
    return run_training(net, bundle, args, out)
