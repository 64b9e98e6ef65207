#!/usr/bin/env bash
# Every GPU benchmark in one call (about 6-8 minutes on an H100/H200), results named after the GPU:
#   bench/results/perf_<gpu>.{md,json}      full-KB ranking, training epoch + batch sweep, CLIP image features
#   bench/results/caption_<gpu>.{md,json}   BLIP-2 OPT-2.7B generate (bf16, batch 1/8/32) and caption_dataset on
#                                           1,000 images end to end
#   bench/results/regions_<gpu>.{md,json}   detector + crop encoding throughput
# Usage (from the repository root, on the GPU machine):  bash bench/gpu_all.sh [PYTHON]
# Logs go to $OUT/ (the device tool's output folder) when OUT is set, else to bench/results/logs_<gpu>/.
# Each benchmark has its own time limit, so one slow case cannot take the others down with it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python3}}"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"   # the checkout, installed or not
gpu=$("${PY}" -c "import torch; n = torch.cuda.get_device_name(0).lower(); print(next((k for k in ('h200', 'h100', 'a100', 'l40s', 'a10') if k in n), n.split()[-1]))") || {
  echo "error: no CUDA GPU visible to ${PY}" >&2; exit 2; }
logs="${OUT:-bench/results/logs_${gpu}}"
mkdir -p "${logs}" bench/results
echo "GPU: ${gpu}; logs in ${logs}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > "${logs}/nvidia_smi.csv" 2>&1 || true

run() {  # run NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== ${name} (limit ${limit} s): $*"
  timeout "${limit}" "$@" > "${logs}/${name}.log" 2>&1
  local rc=$?
  echo "   ${name}: exit ${rc} after $((SECONDS - t0)) s"
  tail -n 25 "${logs}/${name}.log"
}

run perf 300 "${PY}" bench/bench_perf.py --scale full --device cuda --out "bench/results/perf_${gpu}"
run caption 150 "${PY}" bench/bench_caption.py --device cuda --dtypes bf16 --batch-sizes 1,8,32 --repeats 2 \
  --e2e-images 1000 --out "bench/results/caption_${gpu}"
run regions 90 "${PY}" bench/bench_regions.py --device cuda --images 256 --out "bench/results/regions_${gpu}"
for f in bench/results/*_"${gpu}".md bench/results/*_"${gpu}".json; do
  [ -n "${OUT:-}" ] && cp "$f" "${OUT}/" 2>/dev/null
done
ls -l bench/results/*_"${gpu}".*
