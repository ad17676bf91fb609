"""``train``: train a baseline model from scratch (also the shared code of ``finetune``)."""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from compressor.commands import add_common, new_parser
from compressor.commands._options import (EPOCH_FRACTION, check_layer, nonneg_float, nonneg_int, positive_float, positive_int,
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

Per-model defaults (e.g. SqueezeNet: lr 0.01, 1 warm-up epoch) come from the `train:` entries of
compressor/recipes/models.yaml; a run prints the recipe it used. --config and flags override them.
The data contract (classes, input size, normalisation, resize policy) is recorded in every
checkpoint; later commands read their data from it.

outputs (--out folder; refused if it holds another run's files, unless --overwrite): last.pt (every epoch), best.pt (best validation accuracy; the test
split is only evaluated), metrics.jsonl, resolved_config.yaml, summary.json.
"""


def _recipe_lines() -> str:
    """The per-model ``train:`` defaults in use, for --help."""
    import yaml

    from compressor.recipe import MODEL_RECIPES

    table = yaml.safe_load(MODEL_RECIPES.read_text())
    rows = [f"  {name:<14} " + ", ".join(f"{k} {v}" for k, v in (entry.get("train") or {}).items())
            for name, entry in table.items() if isinstance(entry, dict) and entry.get("train")]
    return f"\nper-model defaults in use ({MODEL_RECIPES.name}, matched by name prefix):\n" + "\n".join(rows) + "\n"


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
    from compressor import recipe

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
    from compressor.errors import UserError
    from compressor.train import TrainConfig

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
        if getattr(first, "model", None) and not hasattr(first, "checkpoint"):  # train, not finetune
            return _with_model_recipe(args, first.model), None, None
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


def _with_model_recipe(args: argparse.Namespace, arch: str) -> argparse.Namespace:
    """defaults < the model's ``train:`` values (recipes/models.yaml) < --config < flags; says which."""
    from compressor import recipe

    rec = recipe.model_recipe(arch)
    values = dict(rec.get("train") or {})
    resolved = recipe.resolve(args, saved=values, saved_source=rec["source"])
    given = set(vars(args)) | set(recipe.read(args.config) if getattr(args, "config", None) else {})
    used = {k: v for k, v in values.items() if k not in given}
    if used:
        print(f"train recipe {rec['source']}: " + ", ".join(f"{k} {v}" for k, v in used.items())
              + " (--config or flags override)")
    return resolved


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
    from compressor import distributed

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
    ok, rc = False, 0
    try:
        with _claim(out, args, ctx) as run:
            started = time.time_ns()
            try:
                rc = _train_and_report(net, bundle, args, out, ck, src_rec, carried, recipe_used, source, ctx)
            except BaseException:
                _keep_resume_point(run, out, started)
                raise
        ok = True
        return rc
    finally:
        distributed.shutdown(barrier=ok)  # unwinding from an error: the peers stopped at the same point


def _claim(out: Path, args: argparse.Namespace, ctx: Any) -> Any:
    """The run folder, claimed by the process that writes (``compressor.runfolder``): a foreign
    non-empty ``--out`` is refused unless ``--overwrite``/``--resume``, a concurrent run too."""
    import contextlib

    from compressor import runfolder

    if not ctx.is_main:
        return contextlib.nullcontext()
    command = "finetune" if hasattr(args, "checkpoint") else "train"
    return runfolder.claim(out, command=command, overwrite=bool(getattr(args, "overwrite", False)),
                           resume=bool(args.resume))


def _keep_resume_point(run: Any, out: Path, started_ns: int) -> None:
    """An interrupted run keeps what ``--resume`` needs once it wrote a last.pt; before that it leaves nothing."""
    from compressor.errors import UserError

    last = out / "last.pt"
    if run is None or not last.exists() or last.stat().st_mtime_ns < started_ns:
        return
    for name in ("last.pt", "best.pt", "metrics.jsonl", RESOLVED):
        if (out / name).exists():
            try:
                run.record(out / name, keep=True)
            except UserError:  # the manifest cannot be rewritten (a full disk): the run's own error is the news
                return


def _train_and_report(net: nn.Module, bundle: DataBundle, args: argparse.Namespace, out: Path,
                      ck: Mapping[str, Any], src_rec: Any, carried: dict[str, Any], recipe_used: Any,
                      source: str | None, ctx: Any) -> int:
    """Fit, then (rank 0) the test report."""
    from compressor import checkpoint, contract, data, distributed
    from compressor.train import config_dict, fit

    device = ctx.device
    data.check_classes(bundle, net.num_classes, source=source or args.resume)
    teacher = load_teacher(args.teacher, net.arch) if args.teacher else None
    cfg = train_config(args)
    extra = {"resumed_from": str(args.resume)} if args.resume else {}
    dc = contract.of(net)
    if dc is not None and args.data is None:  # resolved from the contract: the records say what was used
        args.data, args.data_root = dc.dataset, args.data_root if args.data_root is not None else dc.root
    prov = checkpoint.provenance(seed=args.seed, data=dc.dataset if dc else args.data,
                                 data_root=dc.root if dc else args.data_root,
                                 val_size=args.val_size, train=config_dict(cfg), recipe=recipe_used,
                                 processes=ctx.world_size, teacher=args.teacher, source=src_rec, **extra)
    distributed.run_on_main(lambda: write_resolved(out, args, header=f"resolved options of: {prov['command']}"),
                            ctx)  # rank 0 writes; a failure there stops every rank, at once
    meta = {"rates": ck.get("rates"), "plan": ck.get("plan"), "prov": prov, "metrics": carried}
    history = fit(net, bundle, cfg, device, progress=not args.no_progress and ctx.is_main,
                  log=lambda r: print(_fmt(r, cfg.epochs), flush=True), teacher=teacher, out_dir=out,
                  resume=ck if args.resume else None, resume_source=args.resume, ckpt_meta=meta, ctx=ctx)
    rc = distributed.run_on_main(lambda: _report(net, bundle, out, history, device), ctx)
    return int(rc or 0)


def _report(net: nn.Module, bundle: DataBundle, out: Path, history: list[dict[str, Any]], device: Any) -> int:
    """Test accuracy of best.pt (selected on val) and of the last epoch; never used to select."""
    from compressor import checkpoint, data, io
    from compressor.evaluation import evaluate

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
    where = {k: f"{bundle.notes[k]}/" if k == "test_split" else bundle.notes[k]
             for k in ("test_split", "val_split") if bundle.notes.get(k)}  # an ImageFolder's folders
    summary.update(where)
    io.write_json(out / "summary.json", summary)
    folder = f" [{where['test_split']}, {summary['last']['test']['n']} images]" if where else ""
    line = f"test top-1{folder}: last epoch {summary['last']['test']['top1']:.2f}%"
    if "best" in summary:
        line += (f", best.pt (epoch {summary['best']['epoch']}, val {summary['best']['val_acc']:.2f}%) "
                 f"{summary['best']['test']['top1']:.2f}%")
    print(line + " (test is never used for selection)")
    print(f"outputs in {out}: " + ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from compressor import contract, io
    from compressor.errors import UserError
    from compressor.models import get_model

    args, net, ck = resolve_args(args)
    if args.resume:
        out = io.check_writable(Path(args.out or Path(args.resume).parent))
        return run_training(net, load_data(args, net.input_size, net, ck, args.resume), args, out, ck=ck)
    if not args.model:
        raise UserError("--model is required (as a flag or a recipe key) unless --resume is given", field="model")
    out = io.check_writable(Path(args.out or f"checkpoints/{args.model}_{args.data or 'digits'}"))
    size = {"input_size": args.input_size} if getattr(args, "input_size", None) else {}
    probe = get_model(args.model, num_classes=args.num_classes if args.num_classes is not None else 10, **size)
    bundle = load_data(args, probe.input_size, probe, probe=True)
    torch.manual_seed(args.seed)  # the initial weights are a function of --seed too
    net = get_model(args.model, num_classes=args.num_classes if args.num_classes is not None else bundle.num_classes,
                    **size)
    contract.attach(net, contract.of(probe))  # the data contract this run sets
    return run_training(net, bundle, args, out)
