#!/usr/bin/env bash
# ResNet-56 from akamaster's weights (../shared/data) on the CIFAR-10 JPEG copy, CHIP's 47%-MACs rates:
# rank (hrank, l1, random; 768 training images, seed 0) -> prune -> BN re-estimation / reconstruction ->
# a 1-epoch fine-tune of the l1 model. Logs and summaries land in checkpoints/resnet56_chip48/ and this folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
W=../shared/data/pretrained/resnet56-4bfd9763.th
D="--data cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz"
OUT=checkpoints/resnet56_chip48
mkdir -p "$OUT"
$PY -m compressor rank --model resnet56 --checkpoint $W $D --criterion hrank,l1,random --seed 0 \
    --out $OUT/scores.pt --no-progress
for c in hrank l1 random; do
  $PY -m compressor prune --model resnet56 --weights $W $D --rates experiments/resnet56_cifar10/chip_48.yaml \
      --scores $OUT/scores.pt --criterion $c --out $OUT/$c --no-progress
  $PY -m compressor prune --model resnet56 --weights $W $D --rates experiments/resnet56_cifar10/chip_48.yaml \
      --scores $OUT/scores.pt --criterion $c --reconstruct --out $OUT/${c}_recon --no-progress
done
$PY -m compressor prune --model resnet56 --weights $W $D --rates experiments/resnet56_cifar10/chip_48.yaml \
    --scores $OUT/scores.pt --criterion l1 --reconstruct --finetune-epochs 1 --lr 0.01 --warmup-epochs 0 --teacher self \
    --out $OUT/l1_recon_ft1 --no-progress
$PY - <<'PY'
import json, pathlib
root = pathlib.Path("checkpoints/resnet56_chip48")
rows = ["| run | recovery | MACs | params | baseline | after surgery | + BN | + reconstruct | fine-tuned |",
        "|---|---|---|---|---|---|---|---|---|"]
for p in sorted(root.glob("*/summary.json")):
    m = json.loads(p.read_text())
    g = lambda k: f"{m[k]['top1']:.2f}" if k in m else ""
    rows.append(f"| {p.parent.name} | {m.get('recovery')} | {m['size_after']['macs']/1e6:.2f}M | "
                f"{m['size_after']['params']/1e6:.3f}M | {g('baseline_test')} | {g('pruned_test_no_finetune')} | "
                f"{g('pruned_test_bn_recalibrated')} | {g('pruned_test_reconstructed')} | {g('finetuned_test')} |")
out = pathlib.Path("experiments/resnet56_cifar10/results_chip48.md")
out.write_text("\n".join(rows) + "\n")
print(out.read_text())
PY
