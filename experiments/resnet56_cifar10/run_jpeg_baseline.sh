#!/usr/bin/env bash
# ResNet-56 (akamaster's weights) first adapted to the CIFAR-10 JPEG copy, then pruned at CHIP's 48% rates
# ("[0.]+[0.15]*2+[0.4]*27"): the fair baseline the first ResNet-56 run lacked (issue 11).
#  1. finetune the unpruned model on the JPEG copy (2 epochs, lr 0.01 cosine, batch 128; best.pt selected on val);
#  2. prune its best.pt with l1 / random / hrank + reconstruction (the baseline accuracy recorded in best.pt is
#     reused: same split, count and data contract);
#  3. l1 + reconstruction + 1 distilled epoch (--teacher self), curve every 1/4 epoch.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
W=../shared/data/pretrained/resnet56-4bfd9763.th
OUT=checkpoints/resnet56_jpeg
R=experiments/resnet56_cifar10/chip_48.yaml
$PY -m compressor finetune --checkpoint $W --model resnet56 --data cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz \
    --epochs 2 --lr 0.01 --warmup-epochs 0 --batch-size 128 --eval-every 0.25 --seed 0 --out $OUT/baseline_ft --no-progress --overwrite
B=$OUT/baseline_ft/best.pt
for c in l1 random hrank; do
  $PY -m compressor prune --checkpoint $B --rates $R --criterion $c --reconstruct --seed 0 \
      --out $OUT/${c}_recon --no-progress --overwrite
done
$PY -m compressor prune --checkpoint $B --rates $R --criterion l1 --reconstruct --finetune-epochs 1 --lr 0.01 --warmup-epochs 0 \
    --teacher self --eval-every 0.25 --seed 0 --out $OUT/l1_recon_ft1 --no-progress --overwrite
$PY - <<'PY'
import json, pathlib
root = pathlib.Path("checkpoints/resnet56_jpeg")
rows = ["| run | baseline | after surgery | + reconstruct | + 1 distilled epoch | MACs | params |", "|---|---|---|---|---|---|---|"]
for p in sorted(root.glob("*/summary.json")):
    if p.parent.name == "baseline_ft":
        continue
    m = json.loads(p.read_text())
    g = lambda k: f"{m[k]['top1']:.2f}" if m.get(k) else ""
    rows.append(f"| {p.parent.name} | {g('baseline_test')} | {g('pruned_test_no_finetune')} | "
                f"{g('pruned_test_reconstructed')} | {g('finetuned_test')} | {m['size_after']['macs'] / 1e6:.2f}M | "
                f"{m['size_after']['params'] / 1e6:.3f}M |")
s = json.loads((root / "baseline_ft" / "summary.json").read_text())
print(f"baseline fine-tuned on the JPEG copy: best.pt epoch {s['best']['epoch']}, val {s['best']['val_acc']:.2f}%, "
      f"test {s['best']['test']['top1']:.2f}%")
print("\n".join(rows))
PY
