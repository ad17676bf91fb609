#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes on one modern GPU); writes ONE JSON of figures.
#
#   bash benchmarks/gpu_check.sh [OUT_JSON]        # default: $OUT/gpu_check.json, else ./gpu_check.json
#
# Sections (each under its own time limit; one failing is recorded and the others still run):
#   train    AMP + channels_last fine-tune throughput of compressor.training.train.fit ÷ a plain fp32 loop
#            (benchmarks/bench_train.py --device cuda; synthetic in-memory images)
#   latency  CUDA latency (CUDA events) of VGG16-BN unpruned vs CHIP-58 pruned vs round_to 8 at equal MACs,
#            batch 1/64/256, contiguous and channels_last, fp32
#   rank     our HRank pass ÷ HRank's per-(image, channel) matrix_rank reference, both on the GPU, and whether
#            the ranks are identical (CIFAR-10 if ../shared/data has it, else synthetic images)
#   ddp      a 2-process torchrun (NCCL) run of compressor.training.train.fit when there are >= 2 GPUs; weights compared
#            across ranks afterwards
#
# Venv-free: it uses `python3` (or $PYTHON) as found, with torch installed there. Pure-python dependencies
# that are missing there (torch_pruning, yaml) may be supplied by pointing $COMPRESSOR_PYDEPS at a folder made
# with `pip install --no-deps --target DIR torch-pruning==1.6.1 pyyaml`. Exits 3 with a clear message (and an
# error JSON) when no CUDA device is visible.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DEST="${1:-${OUT:-.}/gpu_check.json}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
PARTS="$WORK/parts"
mkdir -p "$PARTS" "$(dirname "$DEST")"
export PYTHONPATH="$REPO${COMPRESSOR_PYDEPS:+:$COMPRESSOR_PYDEPS}${PYTHONPATH:+:$PYTHONPATH}"
export COMPRESSOR_CACHE="$WORK/cache" TQDM_DISABLE=1
cd "$REPO"

fail_json() {  # $1: message
    "$PY" - "$DEST" "$1" <<'EOF' 2>/dev/null || printf '{"ok": false, "error": "%s"}\n' "$1" > "$DEST"
import json, sys
json.dump({"ok": False, "error": sys.argv[2]}, open(sys.argv[1], "w"), indent=1)
EOF
}

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check: no python interpreter '$PY' (set PYTHON=...)" >&2; fail_json "no python"; exit 3
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: torch is not importable with $PY" >&2; fail_json "torch not importable"; exit 3
fi
NGPU="$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)"
if [ "${NGPU:-0}" -lt 1 ]; then
    echo "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); this check needs a GPU" >&2
    fail_json "no CUDA device"
    exit 3
fi
MISSING="$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('torch_pruning', 'yaml', 'numpy') if u.find_spec(m) is None))")"
echo "gpu_check: $NGPU GPU(s); python $("$PY" -c 'import sys; print(sys.version.split()[0])'); missing: ${MISSING:-none}" >&2

section() {  # $1 name, $2 time limit (s), rest: command; records rc and the log tail
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)" >&2
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    "$PY" - "$PARTS/_status_$name.json" "$name" "$rc" "$((SECONDS - t0))" "$WORK/$name.log" <<'EOF'
import json, sys
path, name, rc, secs, log = sys.argv[1:]
tail = open(log, errors="replace").read()[-1500:]
json.dump({"section": name, "rc": int(rc), "seconds": int(secs), "timed_out": rc in ("124", "137"),
           "log_tail": tail}, open(path, "w"))
EOF
    tail -n 5 "$WORK/$name.log" >&2
}

# ------------------------------------------------------------------ train: fit (AMP + channels_last) ÷ plain fp32
section train 110 "$PY" - "$PARTS/train.json" <<'EOF'
import json, re, subprocess, sys
cmd = [sys.executable, "benchmarks/bench_train.py", "--device", "cuda", "--model", "vgg16_bn", "--images", "4096",
       "--batch-size", "256", "--rounds", "4"]
out = subprocess.run(cmd, capture_output=True, text=True, timeout=100)
print(out.stdout[-3000:], out.stderr[-2000:])
m = re.search(r"ratio fit / plain\s+([0-9.]+)", out.stdout)
plain = re.search(r"plain fp32 loop\s+([0-9.]+)", out.stdout)
ours = re.search(r"compressor.fit\s+([0-9.]+)", out.stdout)
json.dump({"train": {"command": " ".join(cmd[1:]), "rc": out.returncode,
                     "fit_amp_channels_last_over_plain_fp32": float(m[1]) if m else None,
                     "plain_fp32_img_per_s": float(plain[1]) if plain else None,
                     "fit_img_per_s": float(ours[1]) if ours else None}}, open(sys.argv[1], "w"))
sys.exit(0 if m else 1)
EOF

# ------------------------------------------------------------------ latency: pruned VGG16-BN on CUDA
section latency 100 "$PY" - "$PARTS/latency.json" <<'EOF'
import json, sys
import torch
from compressor.pruning import counting
from compressor.pruning import policy
from compressor.deploy.latency import LatencyConfig, compare, overlaps, backend_settings
from compressor.models import get_model
from compressor.models._spec import cfg_with_widths
from compressor.pruning.rates import RateSpec, resolve_rates

torch.manual_seed(0)
base = get_model("vgg16_bn").eval()
names = [u.name for u in base.prunable_units()]
widths = {u.name: u.width for u in base.prunable_units()}
rates = resolve_rates("[0.21]*7+[0.75]*5", names, short_list=12)
plain_keep = RateSpec(rates=rates).keep_counts(widths)
pruned = get_model("vgg16_bn", cfg=cfg_with_widths(base, plain_keep)).eval()  # widths decide latency
frac = counting.count(pruned)["macs"] / counting.count(base)["macs"]
spec = policy.resolve(RateSpec(rates=rates, target={"macs": frac}, round_to=8), base)
r8 = get_model("vgg16_bn", cfg=cfg_with_widths(base, spec.keep_counts(widths))).eval()
models = {"base": base, "chip58": pruned, "chip58_round8": r8}
macs = {k: counting.count(m)["macs"] for k, m in models.items()}
res = {"macs": macs, "backends": backend_settings(), "rows": {}}
for cl in (False, True):
    cfg = LatencyConfig(batch_sizes=(1, 64, 256), warmup=10, repeats=30, cuda=True, channels_last=cl)
    out = compare(models, 32, cfg, "cuda")
    for b in cfg.batch_sizes:
        tb = out["base"][b]
        row = {}
        for k in models:
            t = out[k][b]
            sp = tb.median_ms / t.median_ms
            row[k] = {"median_ms": t.median_ms, "iqr_ms": t.iqr_ms, "speedup": sp,
                      "speedup_over_mac_reduction": sp / (macs["base"] / macs[k]), "iqr_overlaps_base": overlaps(tb, t)}
        res["rows"][f"b{b}_{'channels_last' if cl else 'contig'}"] = row
print(json.dumps(res["rows"], indent=1)[:3000])
json.dump({"cuda_latency_vgg16_bn": res}, open(sys.argv[1], "w"))
EOF

# ------------------------------------------------------------------ rank: ours ÷ HRank reference, on the GPU
section rank 130 "$PY" - "$PARTS/rank.json" <<'EOF'
import json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
from bench_rank import reference_ranks  # HRank's algorithm: one matrix_rank (and sync) per image and channel
from compressor.models import get_model
from compressor.pruning.scores import compute

N, B = 64, 64  # the reference makes N × 4224 matrix_rank calls: keep it inside the limit
torch.manual_seed(0)
model = get_model("vgg16_bn").eval().cuda()
what = "random VGG16-BN, synthetic N(0,1) images"
shared = Path("..") / "shared" / "data"
try:
    from compressor import data
    from compressor.storage import checkpoint
    if (shared / "pretrained" / "vgg16_bn_cifar10_jpeg.pt").exists() and (shared / "cifar10-jpeg.tar.gz").exists():
        model, _ = checkpoint.load(shared / "pretrained" / "vgg16_bn_cifar10_jpeg.pt", model="vgg16_bn")
        model = model.eval().cuda()
        bundle = data.load("cifar10", shared / "cifar10-jpeg.tar.gz", seed=0)
        calib = data.calibration_subset(bundle.train_eval, N, 0)
        batches = [x.cuda() for x, _ in data.loader(calib, B)][: N // B]
        what = "VGG16-BN baseline, CIFAR-10 JPEG copy"
    else:
        raise FileNotFoundError
except Exception:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(B, 3, 32, 32, generator=g).cuda() for _ in range(N // B)]
units = model.prunable_units()
with torch.no_grad():
    model(batches[0]); torch.cuda.synchronize()
t0 = time.perf_counter()
with torch.no_grad():
    for x in batches:
        model(x)
torch.cuda.synchronize(); t_fwd = time.perf_counter() - t0
compute(model, batches[:1], ["hrank"], n_images=B, seed=0, progress=False, device="cuda")  # warm-up
torch.cuda.synchronize(); t0 = time.perf_counter()
ours = compute(model, batches, ["hrank"], n_images=N, seed=0, progress=False, device="cuda")
torch.cuda.synchronize(); t_ours = time.perf_counter() - t0
t0 = time.perf_counter()
ref = reference_ranks(model, batches, units)
torch.cuda.synchronize(); t_ref = time.perf_counter() - t0
diff = max(float((ref[u.name].cpu() - ours.scores["hrank"][u.name].cpu()).abs().max()) for u in units)
same = diff == 0.0
out = {"images": N, "batch": B, "data": what, "reference_s": t_ref, "ours_s": t_ours, "forward_s": t_fwd,
       "reference_over_ours": t_ref / t_ours, "ours_over_forward": t_ours / t_fwd, "ranks_identical": same,
       "max_rank_difference": diff}
print(out)
json.dump({"rank_gpu": out}, open(sys.argv[1], "w"))
EOF

# ------------------------------------------------------------------ ddp: 2 processes (NCCL) when >= 2 GPUs
if [ "$NGPU" -ge 2 ]; then
cat > "$WORK/ddp.py" <<'EOF'
import json, sys, time
import torch
from torch.utils.data import TensorDataset
from compressor.training import distributed
from compressor.data import DataBundle
from compressor.models import get_model
from compressor.training.train import TrainConfig, fit

ctx = distributed.init("cuda")
g = torch.Generator().manual_seed(0)
x, y = torch.randn(4096, 3, 32, 32, generator=g), torch.randint(0, 10, (4096,), generator=g)
ds = TensorDataset(x, y)
bundle = DataBundle("synthetic", ds, ds, TensorDataset(x[:0], y[:0]), ds, 10, 32)
torch.manual_seed(0)
model = get_model("vgg16_bn", num_classes=10)
t0 = time.perf_counter()
hist = fit(model, bundle, TrainConfig(epochs=2, batch_size=128, lr=0.01), ctx.device, progress=False, ctx=ctx)
secs = time.perf_counter() - t0
flat = torch.cat([p.detach().float().flatten() for p in model.parameters()]).to(ctx.device)
summ = torch.stack([flat.sum(), (flat * flat).sum()])
gathered = [torch.zeros_like(summ) for _ in range(ctx.world_size)]
torch.distributed.all_gather(gathered, summ)
if ctx.is_main:
    same = all(torch.equal(gathered[0], t) for t in gathered)
    json.dump({"ddp": {"world_size": ctx.world_size, "backend": torch.distributed.get_backend(), "seconds": secs,
                       "img_per_s_last_epoch": hist[-1].get("img_per_s"), "weights_identical_across_ranks": same,
                       "train_loss_last_epoch": hist[-1].get("train_loss")}}, open(sys.argv[1], "w"))
distributed.shutdown()
EOF
section ddp 110 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 "$WORK/ddp.py" "$PARTS/ddp.json"
else
    echo "{\"ddp\": {\"skipped\": \"only $NGPU GPU\"}}" > "$PARTS/ddp.json"
fi

# ------------------------------------------------------------------ one JSON
"$PY" - "$PARTS" "$DEST" "$MISSING" <<'EOF'
import glob, json, os, platform, sys, time
import torch
parts, dest, missing = sys.argv[1], sys.argv[2], sys.argv[3]
doc = {"ok": True, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
       "torch": torch.__version__, "cuda": torch.version.cuda,
       "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
       "missing_python_modules": missing.split(), "sections": {}}
for p in sorted(glob.glob(os.path.join(parts, "*.json"))):
    d = json.load(open(p))
    if os.path.basename(p).startswith("_status_"):
        doc["sections"][d["section"]] = d
        doc["ok"] &= d["rc"] == 0
    else:
        doc.update(d)
json.dump(doc, open(dest, "w"), indent=1, default=str)
print(f"gpu_check: wrote {dest} (all sections ok: {doc['ok']})")
EOF
rm -rf "$WORK"
