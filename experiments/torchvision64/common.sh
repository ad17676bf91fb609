# Sourced by the torchvision64 scripts: interpreter, log and checkpoint folders, and a time/load stamp.
PY=${PY:-.venv/bin/python}
LOG=experiments/torchvision64
OUT=checkpoints/tv64
stamp() { echo "== $1: $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"; }
