"""``prune``: rank, cut, (fine-tune), evaluate and save a physically smaller model."""

from __future__ import annotations

import argparse

from compressor.commands import add_common, new_parser
from compressor.commands._options import EPOCH_FRACTION, nonneg_float, nonneg_int, positive_float, positive_int

EXAMPLES = """\
  # the main job on the embedded digits data (trains a quick baseline first)
  python -m compressor prune --model vgg16_bn --rates experiments/vgg16_bn_digits/demo.yaml --finetune-epochs 2
  # the published CHIP/HRankPlus 58%-MACs setting on the CIFAR-10 copy, from a trained checkpoint
  python -m compressor prune --model vgg16_bn --rates experiments/vgg16_bn_cifar10/hrankplus_58.yaml \\
      --checkpoint ../shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt --data cifar10 \\
      --data-root ../shared/data/cifar10-jpeg.tar.gz
  # any torchvision classifier, from a saved torchvision state_dict
  python -m compressor prune --model torchvision:resnet18 --weights resnet18.pth --rates r.yaml --input-size 64
  # CIFAR ResNet-56 from akamaster's weights at CHIP's rates, recovered by reconstruction
  python -m compressor prune --model resnet56 --weights ../shared/data/pretrained/resnet56-4bfd9763.th \
      --rates experiments/resnet56_cifar10/chip_48.yaml --data cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz \
      --reconstruct
  # reuse a scores file made by `rank`
  python -m compressor prune --model vgg16_bn --rates r.yaml --checkpoint base.pt --scores scores.pt
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = new_parser(sub, "prune", "rank filters, keep the best at the rates file's rates, rebuild a smaller model",
                   EXAMPLES)
    p.add_argument("--model", default=None,
                   help="registered name (list-layers), torchvision:<name>, or package.module:builder (your own); "
                        "not needed with a --checkpoint that records it")
    p.add_argument("--weights", help="a plain state_dict for --model (torchvision, akamaster or HRank files)")
    p.add_argument("--pretrained", action="store_true", help="torchvision's published weights (needs the network)")
    p.add_argument("--input-size", type=positive_int, default=None,
                   help="input size of a model built here (torchvision:/module: models, and CIFAR variants with "
                        "global pooling, e.g. 64); default: the model's or the checkpoint's")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                   help="prune residual groups (shared index sets); default: the model's (on for CIFAR ResNets)")
    p.add_argument("--reconstruct", action="store_true",
                   help="after surgery, refit each layer that reads pruned channels by least squares "
                        "(calibration images, original BN statistics kept)")
    p.add_argument("--reconstruct-images", type=positive_int, default=512,
                   help="calibration images for --reconstruct (default 512)")
    p.add_argument("--block-refit", type=nonneg_int, default=0, metavar="STEPS",
                   help="then refit each block (e.g. a residual block) by STEPS Adam steps against the unpruned "
                        "block's outputs on the --reconstruct-images calibration images (default 0: off)")
    p.add_argument("--teacher", default=None,
                   help="distil the fine-tune from a teacher: 'self' (the unpruned model) or a checkpoint")
    p.add_argument("--round-to", type=positive_int, default=None, help="round every kept width to a multiple of N")
    p.add_argument("--rates", help="rates.yaml (fraction of filters removed per layer, or a budget)")
    p.add_argument("--macs", type=positive_float, default=None, metavar="FRACTION",
                   help="shorthand for a rates file holding target: {macs: FRACTION} (the fraction of MACs kept)")
    p.add_argument("--params", type=positive_float, default=None, metavar="FRACTION",
                   help="shorthand for target: {params: FRACTION}; with --macs, both are met")
    p.add_argument("--checkpoint", help="trained model to prune; without it a quick baseline is trained first")
    p.add_argument("--criterion", default="hrank",
                   help="filter criterion (default hrank); obs chooses the channels the --reconstruct refit can best "
                        "do without (any model: consumers from the dependency graph)")
    p.add_argument("--scores", help="reuse a scores file from `rank` instead of ranking again")
    p.add_argument("--import-hrank", metavar="DIR", help="use HRank's rank_conv{k}.npy files from DIR")
    p.add_argument("--n-images", type=positive_int, default=768, help="calibration images for ranking (default 768)")
    p.add_argument("--hrank-compat", action="store_true",
                   help="rank at HRank's original relucfg points (4 are MaxPool outputs; conv 13 unranked)")
    p.add_argument("--rank-rtol", type=nonneg_float, default=None, help="rank tolerance rtol (default eps32*max(H,W))")
    p.add_argument("--rank-atol", type=nonneg_float, default=0.0, help="rank tolerance atol (default 0)")
    p.add_argument("--rounding", choices=("keep_floor", "drop_floor"), help="override the rates file's rounding")
    p.add_argument("--no-bn-recalibrate", action="store_true", help="skip BN statistics re-estimation after surgery")
    p.add_argument("--baseline-epochs", type=nonneg_int, default=None,
                   help="epochs for the quick baseline when no --checkpoint (default: the model's quick recipe)")
    p.add_argument("--finetune-epochs", type=nonneg_int, default=0,
                   help="fine-tuning epochs after pruning (default 0); the run goes to <out>/finetune/ with its "
                        "recovery curve")
    p.add_argument("--eval-every", type=EPOCH_FRACTION, default=1.0, metavar="FRACTION",
                   help="fine-tune: validation accuracy every this fraction of an epoch (the recovery curve)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="fine-tuning learning rate (default: the model's, 0.01; SqueezeNet 0.002)")
    p.add_argument("--warmup-epochs", type=nonneg_float, default=None,
                   help="fine-tuning: linear lr warm-up, in epochs (default: the model's, 0.1)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--eval-split", choices=("test", "val"), default="test",
                   help="split the before/after accuracies are measured on (default test; val for quick checks)")
    p.add_argument("--eval-n", type=positive_int, default=None,
                   help="evaluate on a fixed subset of N images of that split (default: all)")
    p.add_argument("--baseline-eval", choices=("auto", "measure", "skip"), default="auto",
                   help="auto: reuse the checkpoint's recorded accuracy when split, count and data contract match, "
                        "else measure (default); measure: always; skip: never")
    p.add_argument("--out", help="output folder (default checkpoints/<model>_<data>_<rates>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's outputs in --out (a folder with other files is refused)")
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    from compressor import TrainConfig, model_recipe
    from compressor.errors import UserError
    from compressor.jobs.pipeline import PruneJob, run_prune

    if args.model is None:
        if not args.checkpoint:
            raise UserError("--model is required unless --checkpoint names a compressor checkpoint", field="model")
        from compressor.storage import checkpoint

        recorded = checkpoint.read(args.checkpoint).get("model")
        if not isinstance(recorded, str):
            raise UserError("records no model; pass --model", source=args.checkpoint, field="model")
        args.model = recorded
    budget = {k: v for k, v in (("macs", args.macs), ("params", args.params)) if v is not None}
    if bool(budget) == bool(args.rates):
        raise UserError("give --rates FILE, or a budget with --macs and/or --params", field="rates")
    for k, v in budget.items():
        if not 0 < v <= 1:
            raise UserError(f"is the fraction kept, in (0, 1]; got {v}", field=k)
    rates = args.rates or {"target": budget}
    if args.baseline_epochs is not None and args.baseline_epochs < 0:
        raise UserError(f"must be >= 0, got {args.baseline_epochs}", field="baseline-epochs")
    try:
        rec = model_recipe(args.model)
        lr = args.lr if args.lr is not None else float(rec["finetune_lr"])
        finetune = TrainConfig(epochs=args.finetune_epochs, lr=lr, batch_size=args.batch_size, seed=args.seed,
                               eval_every=args.eval_every,
                               warmup_epochs=args.warmup_epochs if args.warmup_epochs is not None
                               else float(rec["finetune_warmup_epochs"]))
    except ValueError as exc:
        raise UserError(str(exc), field="finetune-epochs/lr/batch-size/warmup-epochs") from exc
    job = PruneJob(
        model=args.model, rates=rates, checkpoint=args.checkpoint, data=args.data, data_root=args.data_root,
        download=args.download,
        num_classes=args.num_classes, criterion=args.criterion, scores=args.scores, import_hrank=args.import_hrank,
        n_images=args.n_images, seed=args.seed, hrank_compat=args.hrank_compat, rank_rtol=args.rank_rtol,
        rank_atol=args.rank_atol, rounding=args.rounding,
        bn_recalibrate=not args.no_bn_recalibrate, baseline_epochs=args.baseline_epochs,
        finetune=finetune, weights=args.weights, pretrained=args.pretrained, input_size=args.input_size,
        residual=args.residual, reconstruct=args.reconstruct, reconstruct_images=args.reconstruct_images,
        block_steps=args.block_refit,
        teacher=args.teacher, round_to=args.round_to, eval_split=args.eval_split, eval_n=args.eval_n,
        baseline_eval=args.baseline_eval, mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
        device=args.device, out=args.out, overwrite=args.overwrite, progress=not args.no_progress,
    )
    result = run_prune(job)
    m = result["metrics"]
    print(result["table"])
    print()
    ev = m["eval"]
    base_acc = m["baseline_test"]
    before = "not measured" if base_acc is None else f"{base_acc['top1']:.2f}%" + (" (recorded)" if base_acc.get("reused") else "")
    line = (f"top-1 on {ev['split']} ({ev['n']} images): baseline {before}, "
            f"pruned {m['pruned_test_no_finetune']['top1']:.2f}%")
    if "pruned_test_reconstructed" in m:
        line += f", reconstructed {m['pruned_test_reconstructed']['top1']:.2f}%"
    if "pruned_test_block_refit" in m:
        line += f", block refit {m['pruned_test_block_refit']['top1']:.2f}%"
    if "pruned_test_bn_recalibrated" in m:
        line += f", pruned+BN re-estimated {m['pruned_test_bn_recalibrated']['top1']:.2f}%"
    if "finetuned_test" in m:
        line += f", fine-tuned {m['finetuned_test']['top1']:.2f}%"
    print(line)
    print(f"outputs in {result['out']}:")
    for k, v in result["paths"].items():
        print(f"  {k:<11} {v}")
    return 0
