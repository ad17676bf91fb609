"""``eval``: accuracy, loss, params, MACs and file size of a checkpoint."""

from __future__ import annotations

import argparse
import json

from compressor.commands import add_common, new_parser
from compressor.commands._options import positive_int

EXAMPLES = """\
  python -m compressor eval --checkpoint checkpoints/vgg16_bn_digits_demo/pruned.pt
  python -m compressor eval --checkpoint pruned.pt --data cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz
  python -m compressor eval --checkpoint pruned.onnx     # onnxruntime, on the data recorded in the file
  python -m compressor eval --checkpoint ../shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt --model vgg16_bn \
      --data cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz --save checkpoints/vgg16_cifar10.pt  # import once

With no --data, the data (dataset, root, classes, normalisation) is the checkpoint's own.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = new_parser(sub, "eval", "evaluate a checkpoint (or an exported .onnx file) on the test split", EXAMPLES)
    p.add_argument("file", nargs="?", metavar="CHECKPOINT", help="the checkpoint or .onnx file (or --checkpoint)")
    p.add_argument("--checkpoint", help="a checkpoint, or an .onnx file written by export")
    p.add_argument("--weights", help="a plain state_dict (torchvision, akamaster or HRank) for --model, as prune takes")
    p.add_argument("--model", help="needed only for plain (HRank-format) state_dicts")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save", metavar="PT",
                   help="also write the model as a compressor checkpoint carrying this data contract and the measured "
                        "test accuracy (imports a plain HRank/akamaster/torchvision file once; prune then reuses "
                        "the accuracy instead of re-measuring it)")
    add_common(p)
    return p


def evaluate_checkpoint(path: str, args: argparse.Namespace) -> dict:
    """Accuracy of a checkpoint or ONNX file on the test split of its own data (its contract),
    unless ``--data``/``--data-root``/``--mean``/``--std`` say otherwise."""
    from compressor.commands import _data
    from compressor.jobs.evaluate import EvalJob, run_eval

    job = EvalJob(path=path, model=args.model, batch_size=args.batch_size, device=args.device,
                  save=getattr(args, "save", None), progress=not args.no_progress)
    return run_eval(job, lambda net, ck: _data.load(args, net, ck=ck, source=path))


def _source(args: argparse.Namespace) -> str:
    """One file, however it was given: positionally, --checkpoint, or --weights (with --model)."""
    from compressor.errors import UserError

    given = [x for x in (args.file, args.checkpoint, args.weights) if x]
    if len(given) != 1:
        raise UserError("give one file: eval CHECKPOINT, --checkpoint FILE or --weights FILE --model NAME",
                        field="checkpoint")
    if args.weights and not args.model:
        raise UserError("a plain state_dict needs --model to say what it holds", field="weights")
    return given[0]


def run(args: argparse.Namespace) -> int:
    args.checkpoint = _source(args)
    res = evaluate_checkpoint(args.checkpoint, args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        size = (f"  params {res['params'] / 1e6:.3f}M  MACs {res['macs'] / 1e6:.2f}M" if "params" in res and "macs" in res
                else "") + (f"  ({res['runtime']}, {res['precision']})" if res.get("precision")
                            else f"  ({res['runtime']})" if res.get("runtime") != "torch" else "")
        folder = f" [{res['test_split']}]" if res.get("test_split") else ""
        print(f"{res['model']} on {res['data']} test{folder} ({res['n']} images): top-1 {res['top1']:.2f}%  "
              f"top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}{size}  file {res['file_bytes'] / 1e6:.2f} MB")
        if "saved" in res:
            print(f"saved with its data contract and test accuracy: {res['saved']}")
    return 0
