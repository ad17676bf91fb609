"""``eval``: accuracy, loss, params, MACs and file size of a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compressor.commands import add_common, new_parser
from compressor.commands._options import positive_int

EXAMPLES = """\
  python -m compressor eval --checkpoint checkpoints/vgg16_bn_digits_demo/pruned.pt
  python -m compressor eval --checkpoint pruned.pt --data cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = new_parser(sub, "eval", "evaluate a checkpoint on the test split", EXAMPLES)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", help="needed only for plain (HRank-format) state_dicts")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_common(p)
    return p


def evaluate_checkpoint(path: str, data_name: str, data_root: str | None, device_name: str = "auto",
                        model: str | None = None, batch_size: int = 256, seed: int = 0,
                        progress: bool = False, download: bool = False) -> dict:
    from compressor import checkpoint, counting, data
    from compressor.evaluate import evaluate, resolve_device

    device = resolve_device(device_name)
    net, ck = checkpoint.load(path, model=model)
    bundle = data.load(data_name, data_root, input_size=net.input_size, seed=seed, download=download,
                       stats=data.model_stats(net))
    data.check_classes(bundle, net.num_classes, what="checkpoint", source=path)
    res = evaluate(net.to(device), data.loader(bundle.test, batch_size, device=device), device, progress, "eval")
    res.update(counting.count(net.cpu()))
    res.update({"checkpoint": path, "model": ck["model"], "data": data_name, "file_bytes": Path(path).stat().st_size})
    return res


def run(args: argparse.Namespace) -> int:
    res = evaluate_checkpoint(args.checkpoint, args.data, args.data_root, args.device, args.model, args.batch_size,
                              args.seed, not args.no_progress, args.download)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['model']} on {res['data']} test ({res['n']} images): top-1 {res['top1']:.2f}%  "
              f"top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}  params {res['params'] / 1e6:.3f}M  "
              f"MACs {res['macs'] / 1e6:.2f}M  file {res['file_bytes'] / 1e6:.2f} MB")
    return 0
