#!/usr/bin/env bash
# rank -> prune -> fine-tune -> eval for one model on CIFAR-10; the wrapper scripts set MODEL/RATES/RECIPE.
#
# Settings (environment variables, all optional except MODEL and RATES):
#   BASELINE     trained checkpoint to prune; empty = train one first with BASE_RECIPE (into $OUT/baseline)
#   RECIPE       fine-tuning recipe (default experiments/recipes/hrankplus_cifar.yaml; chip_cifar.yaml for CHIP)
#   NPROC        processes (GPUs) for training; >1 launches torchrun. Ranking/pruning run in one process.
#   GLOBAL_BATCH fine-tuning batch over all processes (default 256: the recipes' batch); BASE_BATCH (128)
#   KD=1         distil the fine-tuning from the baseline (--teacher), KD_ALPHA, KD_T
#   DATA, DATA_ROOT, DEVICE, N_IMAGES (ranking images, default 768), SEED, OUT
#   EPOCHS, BASE_EPOCHS  override the recipes' epochs (smoke tests: DATA=digits EPOCHS=1 BASE_EPOCHS=1)
#   FT_ARGS, PRUNE_ARGS  extra flags for `finetune` (e.g. "--compile --workers 8") and `prune`
#   PROGRESS=0   no progress bars (logs)
# Interrupted runs continue from last.pt when the script is started again (a finished step has summary.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MODEL:?set MODEL}" "${RATES:?set RATES}"
if [[ -z ${PY:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
DATA=${DATA:-cifar10}
DATA_ROOT=${DATA_ROOT:-../shared/data/cifar10-jpeg.tar.gz}
RECIPE=${RECIPE:-experiments/recipes/hrankplus_cifar.yaml}
BASE_RECIPE=${BASE_RECIPE:-experiments/recipes/cifar_baseline.yaml}
NPROC=${NPROC:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
BASE_BATCH=${BASE_BATCH:-128}
DEVICE=${DEVICE:-auto}
N_IMAGES=${N_IMAGES:-768}
SEED=${SEED:-0}
KD=${KD:-0}
OUT=${OUT:-runs/${MODEL}_${DATA}_$(basename "$RATES" .yaml)_$(basename "$RECIPE" .yaml)}
BASELINE=${BASELINE:-}

common=(--data "$DATA" --device "$DEVICE" --seed "$SEED")
[[ $DATA == digits ]] || common+=(--data-root "$DATA_ROOT")
[[ ${PROGRESS:-1} == 0 ]] && common+=(--no-progress)

launch() {  # a training command in NPROC processes
  if (( NPROC > 1 )); then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m compressor "$@"
  else
    "$PY" -m compressor "$@"
  fi
}

train_step() {  # train_step OUTDIR args...: skip when finished, resume when interrupted
  local dir=$1; shift
  if [[ -f $dir/summary.json ]]; then echo "== $dir done, skipping"; return; fi
  local resume=()
  [[ -f $dir/last.pt ]] && resume=(--resume "$dir/last.pt") && echo "== resuming $dir/last.pt"
  launch "$@" --out "$dir" "${resume[@]}"
}

mkdir -p "$OUT"
echo "== $MODEL, rates $RATES, recipe $RECIPE, $NPROC process(es), outputs in $OUT"

# 0. Baseline (only when none is given).
if [[ -z $BASELINE ]]; then
  base_epochs=(); [[ -n ${BASE_EPOCHS:-} ]] && base_epochs=(--epochs "$BASE_EPOCHS")
  train_step "$OUT/baseline" train --model "$MODEL" --config "$BASE_RECIPE" "${common[@]}" \
    --batch-size $(( BASE_BATCH / NPROC )) "${base_epochs[@]}"
  BASELINE=$OUT/baseline/best.pt
fi

# 1. Rank: one pass over N_IMAGES un-augmented training images (seeded), all layers at once.
[[ -f $OUT/scores.pt ]] || "$PY" -m compressor rank --model "$MODEL" --checkpoint "$BASELINE" "${common[@]}" \
  --n-images "$N_IMAGES" --out "$OUT/scores.pt"

# 2. Prune: keep the top filters per layer at the rates file's rates; physically smaller model.
# shellcheck disable=SC2086
[[ -f $OUT/prune/pruned.pt ]] || "$PY" -m compressor prune --model "$MODEL" --rates "$RATES" \
  --checkpoint "$BASELINE" --scores "$OUT/scores.pt" "${common[@]}" --out "$OUT/prune" ${PRUNE_ARGS:-}

# 3. Fine-tune with the recipe; best.pt is selected on the held-out validation split.
ft=(); [[ -n ${EPOCHS:-} ]] && ft+=(--epochs "$EPOCHS")
[[ $KD == 1 ]] && ft+=(--teacher "$BASELINE" --kd-alpha "${KD_ALPHA:-0.5}" --kd-temperature "${KD_T:-4}")
# shellcheck disable=SC2206
ft+=(${FT_ARGS:-})
train_step "$OUT/finetune" finetune --checkpoint "$OUT/prune/pruned.pt" --config "$RECIPE" "${common[@]}" \
  --batch-size $(( GLOBAL_BATCH / NPROC )) "${ft[@]}"

# 4. Evaluate on the test split (reported, never used for selection).
"$PY" -m compressor eval --checkpoint "$BASELINE" --model "$MODEL" "${common[@]}" --json > "$OUT/eval_baseline.json"
"$PY" -m compressor eval --checkpoint "$OUT/finetune/best.pt" "${common[@]}" --json > "$OUT/eval_finetuned.json"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
b, f = (json.load(open(f"{out}/eval_{k}.json")) for k in ("baseline", "finetuned"))
print(f"baseline : top-1 {b['top1']:.2f}%  params {b['params']/1e6:.2f}M  MACs {b['macs']/1e6:.2f}M")
print(f"finetuned: top-1 {f['top1']:.2f}%  params {f['params']/1e6:.2f}M ({100*(1-f['params']/b['params']):.1f}% fewer)"
      f"  MACs {f['macs']/1e6:.2f}M ({100*(1-f['macs']/b['macs']):.1f}% fewer)")
PYEOF
