#!/usr/bin/env bash
# Issue 20: torchvision resnet18 and mobilenet_v3_small at 50% of the MACs (--macs 0.5: one uniform rate over the
# units, scaled to the target) from the baselines of train.sh, on the same 64-px ImageFolder. hrank, l1 and obs
# with --reconstruct (512 calibration images, seed 0) at the same kept counts, no fine-tune; then, from l1 and
# obs, one distilled epoch (teacher: the baseline; lr 0.01, no warm-up as recorded; validation every half epoch:
# the recovery curve).
# Test: the 10,000 test/ images. Run from the repository root after train.sh.
set -euo pipefail
. experiments/torchvision64/common.sh
for model in mobilenet_v3_small resnet18; do
  for crit in hrank l1 obs; do
    stamp "$model $crit start"
    $PY -u -m compressor prune --checkpoint $OUT/${model}_base/best.pt --macs 0.5 --criterion $crit --reconstruct \
      --seed 0 --no-progress --device cpu --out $OUT/${model}_${crit} --overwrite 2>&1 | tee $LOG/prune_${model}_${crit}.log
    cp $OUT/${model}_${crit}/summary.json $LOG/summary_${model}_${crit}.json
    stamp "$model $crit done"
  done
done
for model in mobilenet_v3_small resnet18; do
  for crit in obs l1; do
    stamp "$model $crit + 1 distilled epoch start"
    $PY -u -m compressor finetune --checkpoint $OUT/${model}_${crit}/pruned.pt --teacher $OUT/${model}_base/best.pt \
      --epochs 1 --lr 0.01 --warmup-epochs 0 --eval-every 0.5 --seed 0 --no-progress --device cpu --out $OUT/${model}_${crit}_ft1 \
      --overwrite 2>&1 | tee $LOG/finetune_${model}_${crit}.log
    cp $OUT/${model}_${crit}_ft1/summary.json $LOG/summary_ft1_${model}_${crit}.json
    cp $OUT/${model}_${crit}_ft1/recovery_curve.png $LOG/recovery_curve_${model}_${crit}.png
    stamp "$model $crit + 1 distilled epoch done"
  done
done
$PY $LOG/table.py > $LOG/table.md
