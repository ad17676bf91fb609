"""``train``: train a baseline model from scratch."""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor.commands import add_common, new_parser

EXAMPLES = """\
  python -m compressor train --model squeezenet1_1 --epochs 5
  python -m compressor train --model mobilenet_v2 --data cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz \\
      --epochs 30 --lr 0.1 --out checkpoints/mnv2_cifar10.pt
"""


def add_train_args(p: argparse.ArgumentParser, lr: float) -> None:
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "multistep", "onecycle", "constant"))
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=0)


def add_parser(sub) -> argparse.ArgumentParser:
    p = new_parser(sub, "train", "train a baseline model", EXAMPLES)
    p.add_argument("--model", required=True)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--out", default=None, help="checkpoint path (default checkpoints/<model>_<data>.pt)")
    add_train_args(p, lr=0.05)
    add_common(p)
    return p


def train_and_save(net, bundle, args, out: Path, *, rates=None, plan=None) -> int:
    from compressor import checkpoint, data
    from compressor.evaluate import evaluate, resolve_device
    from compressor.train import TrainConfig, config_dict, fit

    device = resolve_device(args.device)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                      schedule=args.schedule, label_smoothing=args.label_smoothing, workers=args.workers,
                      seed=args.seed)
    history = fit(net, bundle, cfg, device, progress=not args.no_progress,
                  log=lambda r: print(f"epoch {r['epoch']}: loss {r['train_loss']:.4f} "
                                      f"val {r.get('val_acc', float('nan')):.2f}% ({r['img_per_s']:.0f} img/s)"))
    test = evaluate(net, data.loader(bundle.test, 256, device=device), device)
    checkpoint.save(out, net.cpu(), rates=rates, plan=plan,
                    metrics={"test": test, "history": history, "val_acc": history[-1].get("val_acc") if history else None},
                    prov=checkpoint.provenance(seed=args.seed, data=args.data, train=config_dict(cfg)))
    print(f"test top-1 {test['top1']:.2f}% (last epoch; not used for selection); checkpoint written to {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from compressor import data
    from compressor.models import get_model

    probe = get_model(args.model, num_classes=args.num_classes or 10)
    bundle = data.load(args.data, args.data_root, input_size=probe.input_size, seed=args.seed)
    net = get_model(args.model, num_classes=args.num_classes or bundle.num_classes)
    out = Path(args.out or f"checkpoints/{args.model}_{args.data}.pt")
    return train_and_save(net, bundle, args, out)
