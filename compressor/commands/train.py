"""``train``: train a baseline model from scratch (also the shared code of ``finetune``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from compressor.commands import add_common, new_parser

EXAMPLES = """\
  python -m compressor train --model vgg16_bn --config experiments/recipes/digits_quick.yaml
  python -m compressor train --model vgg16_bn --data cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz \\
      --config experiments/recipes/hrankplus_cifar.yaml --epochs 200 --lr 0.1 --out checkpoints/vgg16_cifar10
  python -m compressor train --model vgg16_bn --resume checkpoints/vgg16_cifar10/last.pt   # continue exactly
  torchrun --nproc_per_node=4 -m compressor train --model mobilenet_v2 --data cifar10 --data-root DIR --epochs 30

outputs (--out folder): last.pt (every epoch), best.pt (best validation accuracy; the test
split is only evaluated), metrics.jsonl, resolved_config.yaml, summary.json.
"""


def add_train_args(p: argparse.ArgumentParser, lr: float) -> None:
    """Options shared by ``train`` and ``finetune``; every one can also be a recipe key."""
    B = argparse.BooleanOptionalAction
    p.add_argument("--config", metavar="YAML", help="recipe file (experiments/recipes/*.yaml); flags override it")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--resume", metavar="LAST_PT", help="continue a run from its last.pt (model, optimizer, RNG, epoch)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--nesterov", action=B, default=True, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-decay-bn-bias", action="store_true", help="no weight decay on BN parameters and biases")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "multistep", "onecycle", "constant"))
    p.add_argument("--milestones", type=int, nargs="+", default=[], help="multistep: epochs where lr *= gamma")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up length")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--teacher", metavar="CKPT", help="knowledge distillation from this checkpoint's logits")
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the KD term (1-alpha on cross-entropy)")
    p.add_argument("--amp", action=B, default=True, help="mixed precision on GPU (bf16, else fp16 + GradScaler)")
    p.add_argument("--channels-last", action=B, default=True, help="channels_last memory format on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--val-size", type=int, default=None,
                   help="images held out from train for selection (default: 10%% digits, 5000 CIFAR)")


def add_parser(sub) -> argparse.ArgumentParser:
    from compressor import recipe

    p = new_parser(sub, "train", "train a baseline model", EXAMPLES)
    p.add_argument("--model", default=None, help="registered model name (required unless --resume)")
    p.add_argument("--num-classes", type=int, default=None)
    add_train_args(p, lr=0.05)
    add_common(p)
    return recipe.defer_defaults(p)


def train_config(args: argparse.Namespace):
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


def load_data(args: argparse.Namespace, input_size: int):
    from compressor import data

    return data.load(args.data, args.data_root, input_size=input_size, val_size=args.val_size, seed=args.seed,
                     download=args.download)


def load_teacher(path: str, student_arch: str):
    """A compressor checkpoint of any architecture, or a plain (HRank-style) state_dict of the student's."""
    from compressor import checkpoint

    plain = checkpoint.read(path).get("format") != checkpoint.CKPT_FORMAT
    return checkpoint.load(path, model=student_arch if plain else None)[0]


def run_training(net, bundle, args: argparse.Namespace, out: Path, *, rates=None, plan=None,
                 source: str | None = None) -> int:
    """Fit ``net`` with the resolved ``args``; rank 0 writes ``out``; then evaluate on test."""
    from compressor import checkpoint, distributed, io, recipe
    from compressor.errors import UserError
    from compressor.train import config_dict, fit

    ctx = distributed.init(args.device)
    try:
        device = ctx.device
        if bundle.num_classes != net.num_classes:
            raise UserError(f"the data has {bundle.num_classes} classes, the model {net.num_classes}",
                            source=source, field="num_classes")
        teacher = load_teacher(args.teacher, net.arch) if args.teacher else None
        cfg = train_config(args)
        prov = checkpoint.provenance(seed=args.seed, data=args.data, train=config_dict(cfg), recipe=args.config,
                                     processes=ctx.world_size, teacher=args.teacher, source=source)
        if ctx.is_main:
            io.write_text(out / "resolved_config.yaml", recipe.to_yaml(args, header=f"resolved options of: {prov['command']}"))
        history = fit(net, bundle, cfg, device, progress=not args.no_progress and ctx.is_main,
                      log=lambda r: print(_fmt(r, cfg.epochs), flush=True), teacher=teacher, out_dir=out,
                      resume=args.resume, ckpt_meta={"rates": rates, "plan": plan, "prov": prov}, ctx=ctx)
        if not ctx.is_main:
            return 0
        return _report(net, bundle, out, history, device)
    finally:
        distributed.shutdown()


def _report(net, bundle, out: Path, history, device) -> int:
    """Test accuracy of best.pt (selected on val) and of the last epoch; never used to select."""
    from compressor import checkpoint, data, io
    from compressor.evaluate import evaluate

    test_loader = data.loader(bundle.test, 256, device=device)
    summary: dict[str, Any] = {"epochs": len(history), "last": {"val_acc": history[-1].get("val_acc") if history else None}}
    summary["last"]["test"] = evaluate(net.to(device), test_loader, device)
    best = out / "best.pt"
    if best.exists():
        obj = checkpoint.read(best)
        bnet, _ = checkpoint.load(best)
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
    from compressor import checkpoint, recipe
    from compressor.errors import UserError
    from compressor.models import get_model

    args = recipe.resolve(args)
    if args.resume:
        net, ck = checkpoint.load(args.resume, model=args.model)
        out = Path(args.out or Path(args.resume).parent)
        return run_training(net, load_data(args, net.input_size), args, out, rates=ck.get("rates"),
                            plan=ck.get("plan"), source=args.resume)
    if not args.model:
        raise UserError("--model is required (as a flag or a recipe key) unless --resume is given", field="model")
    probe = get_model(args.model, num_classes=args.num_classes if args.num_classes is not None else 10)
    bundle = load_data(args, probe.input_size)
    net = get_model(args.model, num_classes=args.num_classes if args.num_classes is not None else bundle.num_classes)
    out = Path(args.out or f"checkpoints/{args.model}_{args.data}")
    return run_training(net, bundle, args, out)
