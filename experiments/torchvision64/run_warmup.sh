#!/usr/bin/env bash
# Issue 20: does a short linear warm-up stop the collapse of mobilenet_v3_small's distilled epoch after l1 +
# reconstruct? The same recipe as run_prune.sh (1 epoch, lr 0.01, teacher the baseline, KD T=4 alpha 0.5, seed 0),
# without and with --warmup-epochs 0.1, from the l1 and obs starts. Run after train.sh and run_prune.sh.
set -euo pipefail
. experiments/torchvision64/common.sh
m=mobilenet_v3_small
for crit in l1 obs; do
  for w in 0 0.1; do
    stamp "$m $crit warm-up $w"
    $PY -u -m compressor finetune --checkpoint $OUT/${m}_${crit}/pruned.pt --teacher $OUT/${m}_base/best.pt \
      --epochs 1 --lr 0.01 --warmup-epochs $w --eval-every 0.25 --seed 0 --no-progress --device cpu \
      --out $OUT/${m}_${crit}_ft1_w$w --overwrite 2>&1 | tee $LOG/finetune_${m}_${crit}_w$w.log
    cp $OUT/${m}_${crit}_ft1_w$w/recovery_curve.png $LOG/recovery_curve_${m}_${crit}_w$w.png
  done
done
