#!/usr/bin/env bash
# Correctness and throughput of Darknet-53 on one GPU, ours against timm's.
#
#   benchmarks/gpu_check.sh OUTDIR           # full: one H100, under 8 minutes
#   SMALL=1 benchmarks/gpu_check.sh OUTDIR   # tiny model, 32 px, for a CPU
#
# Steps, each under a time limit inside an overall deadline (DEADLINE_S,
# default 460 s), each writing OUTDIR/NAME.md (its table), NAME.log (its
# stderr) and NAME.json:
#   env        versions, devices and nvidia-smi (env.md only)
#   precision  bfloat16 and float16 train steps against float32, and float16
#              loss scaling (benchmarks/precision_check.py); full: the whole
#              model, batch 32, 128 px, 3 steps
#   compare_SIZEpx_DTYPE  ours against timm's darknet53, train step and
#              inference (benchmarks/compare_timm.py); full: batch 256 at
#              256 and 224 px in each of DTYPES (default bfloat16)
# OUTDIR/summary.md gathers the tables. Exit status 0 when every step ran and
# the precision checks passed.
#
# The GPU machine has no ml_collections: where it is missing, the script
# installs the wheel from WHEELS (default .whl), made on a networked machine
# by `pip download ml_collections==1.1.0 --no-deps -d .whl`. PYTHON (default
# python3) is the interpreter with JAX, flax, optax, torch and timm.
set -u -o pipefail

out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
deadline=${DEADLINE_S:-460}
summary="$out/summary.md"
status=0
export PYTHONUNBUFFERED=1

if [[ -n "${SMALL:-}" ]]; then
  sizes=(32)
  dtypes=(float32)
  tiny=(--width_multiplier=0.125 '--config.model.stage_depths=(1,0,0,0,0)'
        --config.num_classes=10)
  precision_flags=("${tiny[@]}" --image_size=64 --batch_size=8 --steps=2)
  compare_flags=("${tiny[@]}" --batch_size=4 --steps=2
                 --config.benchmark_rounds=2 --config.benchmark_warmup_steps=1)
else
  sizes=(256 224)
  read -r -a dtypes <<< "${DTYPES:-bfloat16}"
  precision_flags=(--image_size=128 --batch_size=32 --steps=3)
  compare_flags=()
fi

if ! "$python" -c 'import ml_collections' 2> /dev/null; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile \
      --target "$site" "${WHEELS:-.whl}"/ml_collections-*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# Runs NAME's command under min(LIMIT_S, time to the deadline); appends its
# table to the summary.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  ((limit > left)) && limit=$left
  echo "## $name" >> "$summary"
  if ((limit <= 0)); then
    echo "skipped: the ${deadline} s deadline has passed" | tee -a "$summary"
    status=1
    return
  fi
  echo "$name (at most ${limit} s)..."
  local start=$SECONDS
  if timeout "$limit" "$@" --json="$out/$name.json" > "$out/$name.md" \
      2> "$out/$name.log"; then
    cat "$out/$name.md" >> "$summary"
  else
    echo "failed with status $? (see $name.log):" >> "$summary"
    tail -n 5 "$out/$name.log" >> "$summary"
    status=1
  fi
  echo "took $((SECONDS - start)) s" >> "$summary"
  echo >> "$summary"
}

{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)${SMALL:+ (small mode)}"
  echo
  echo "## env"
  echo "host $(hostname), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  "$python" - << 'EOF' 2>&1
import flax, jax, optax, torch
from darknet53_jax import timm_compat
print(f'jax {jax.__version__}, flax {flax.__version__}, optax '
      f'{optax.__version__}, torch {torch.__version__}, timm '
      f'{timm_compat.import_timm().__version__}')
print(f'jax devices: {jax.devices()}')
EOF
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm \
        --format=csv
  fi
  echo
} > "$out/env.md" 2>&1
cat "$out/env.md" > "$summary"

# Autotuning picks fast convolution algorithms, not correct ones: off here.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" run_step precision 150 \
    "$python" -m benchmarks.precision_check "${precision_flags[@]}"
for dtype in "${dtypes[@]}"; do
  for size in "${sizes[@]}"; do
    run_step "compare_${size}px_${dtype}" 200 "$python" \
        -m benchmarks.compare_timm "${compare_flags[@]}" --image_size="$size" \
        --dtype="$dtype"
  done
done

cat "$summary"
echo "total $SECONDS s; exit status $status"
exit "$status"
