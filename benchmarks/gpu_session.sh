#!/usr/bin/env bash
# The GPU measurements of issue 7 as stages that fit a lent device's 10-minute calls.
#
#   here, first:   bash benchmarks/device_wheels.sh            (fills .whl/, git-ignored)
#   device call 1: bash benchmarks/gpu_session.sh ceilings core features     (carry .whl)
#   device call 2: bash benchmarks/gpu_session.sh ab                         (carry .whl)
#   on a CPU:      PYTHON=python BUDGET_S=900 bash benchmarks/gpu_session.sh smoke
#
# Stages (run in the order given; each is skipped once the budget is spent):
#   ceilings  measured bf16 matmul rate and device copy bandwidth (device_ceilings.py)
#   core      ViT-B/8 batch 128 and ResNet-18 batch 32: her2jax, PyTorch eager, torch.compile
#   features  ViT-B/8 forward-only batch 128: her2jax and PyTorch
#   ab        ViT-B/8 batch 128: synthetic input, then fed from ArrayRecord shards (a phantom
#             prepared here; e2e_over_synthetic), then the step variants side by side
#             (bench_train.py --variants; no_device_prefetch on shards), each traced for 3
#             steps (Perfetto) with its optimised HLO saved; then where the device time goes
#             (trace_summary.py, by CUDA kernel and by XLA op)
#   b64       ViT-B/8 batch 64 and ResNet-18 batch 64, her2jax and PyTorch eager
#   pretrain  MoCo v3 pretraining step of ViT-B/8 at batch 64: her2jax, PyTorch eager and
#             torch.compile (issue 19's target: >= 1.5x PyTorch)
#   smoke     every path above at CI size (bench_train.py --smoke), for trying this script
#
# Everything lands in $OUT (the device tool brings it back; at most 8 files): results.jsonl
# (every measurement as a JSON line, written as it ends, so a call cut short keeps what it
# measured), log.txt (all stderr), env.txt, traces.jsonl, profiles.tar.gz, hlo.tar.gz, and
# summary.txt, which is also printed last. BUDGET_S (default 540) bounds the whole call.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

OUT=${OUT:-/tmp/gpu_session}
BUDGET_S=${BUDGET_S:-540}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - start))); }
note() { echo "[gpu_session $(date -u +%H:%M:%S), $(left) s left] $*" | tee -a "$OUT/log.txt" >&2; }

# The wheels the image lacks (benchmarks/device_wheels.sh), installed where they shadow the
# image's own versions of flax / optax / orbax.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "${SKIP_WHEELS:-0}" != 1 ]; then
  site=/tmp/her2jax-site
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl >>"$OUT/log.txt" 2>&1 || { note "wheel install failed"; exit 1; }
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>/dev/null || echo "no nvidia-smi"
  nproc
  "$PYTHON" - <<'EOF'
import importlib.metadata as m, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "numpy",
             "torch", "monai", "grain", "array-record", "tensorflow-datasets"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")
import jax
print("devices", jax.devices())
EOF
} >"$OUT/env.txt" 2>>"$OUT/log.txt"
note "environment: $(tr '\n' ' ' <"$OUT/env.txt" | cut -c1-400)"

bench() {  # bench_train.py with the budget left and the shared result file
  local budget
  budget=$(($(left) - 15))
  if [ "$budget" -lt 45 ]; then note "skipped (budget): bench_train $*"; return; fi
  note "bench_train $*"
  "$PYTHON" benchmarks/bench_train.py --jsonl="$OUT/results.jsonl" --budget_s="$budget" "$@" \
    >/dev/null 2>>"$OUT/log.txt" || note "bench_train exited $? ($*)"
}

TIMED=(--warmup=3 --steps=10 --repeat=3)
for stage in "$@"; do
  case "$stage" in
    ceilings)
      note "device_ceilings"
      timeout "$(left)" "$PYTHON" benchmarks/device_ceilings.py >>"$OUT/results.jsonl" \
        2>>"$OUT/log.txt" || note "device_ceilings exited $?" ;;
    core)
      bench --configs=vit_b8_b128 "${TIMED[@]}"
      bench --configs=resnet18_b32 "${TIMED[@]}" ;;
    features)
      bench --configs=vit_b8_features_b128 --frameworks=her2jax,pytorch "${TIMED[@]}" ;;
    ab)
      bench --configs=vit_b8_b128 --frameworks=her2jax --input=pipeline \
        --variants=no_device_prefetch,attn_xla,attn_pad32,no_augment,no_layer_decay,cublas_gemm \
        --profile_dir="$OUT/profiles" --hlo_dir="$OUT/hlo" "${TIMED[@]}" ;;
    b64)
      bench --configs=vit_b8_b64,resnet18_b64 --frameworks=her2jax,pytorch "${TIMED[@]}" ;;
    pretrain)
      bench --configs=vit_b8_pretrain_b64 "${TIMED[@]}" ;;
    smoke)
      bench --smoke --compile=off --input=pipeline --variants=no_augment,no_device_prefetch \
        --profile_dir="$OUT/profiles" --hlo_dir="$OUT/hlo"
      timeout "$(left)" "$PYTHON" benchmarks/device_ceilings.py --smoke \
        >>"$OUT/results.jsonl" 2>>"$OUT/log.txt" || note "device_ceilings exited $?" ;;
    *)
      note "unknown stage $stage (ceilings core features ab b64 pretrain smoke)"; exit 2 ;;
  esac
done

# Where the traced steps' device time goes: by CUDA kernel (streams) and by XLA op.
if [ -d "$OUT/profiles" ]; then
  for trace in "$OUT"/profiles/*/; do
    for thread in Stream "XLA Ops"; do
      "$PYTHON" benchmarks/trace_summary.py "$trace" --thread="$thread" --steps=3 --top=25 \
        2>>"$OUT/log.txt" | "$PYTHON" -c '
import json, sys
for line in sys.stdin:
    print(json.dumps({"measurement": sys.argv[1], "thread": sys.argv[2], **json.loads(line)}))
' "$(basename "$trace")" "$thread" >>"$OUT/traces.jsonl"
    done
  done
  # The Perfetto traces of every measurement, and the XPlane (for xprof) of the plain step's
  # only: one file comes back only under 16 MB.
  (cd "$OUT" && find profiles -name perfetto_trace.json.gz -o -path '*-base/*' -name '*.xplane.pb' \
    | tar -czf profiles.tar.gz -T -) && rm -rf "$OUT/profiles"
fi
if [ -d "$OUT/hlo" ]; then
  tar -C "$OUT" -czf "$OUT/hlo.tar.gz" hlo && rm -rf "$OUT/hlo"
fi

"$PYTHON" - "$OUT/results.jsonl" >"$OUT/summary.txt" 2>>"$OUT/log.txt" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
from bench_train import summary_table
lines, other = [], []
for raw in open(sys.argv[1]):
    line = json.loads(raw)
    (lines if "framework" in line else other).append(line)
for line in other:
    print({k: v for k, v in line.items() if k not in ("versions", "date")})
print(summary_table(lines))
EOF
note "done"
cat "$OUT/summary.txt"
