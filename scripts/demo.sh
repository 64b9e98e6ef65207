#!/usr/bin/env bash
# The synthetic MEL demo, end to end on CPU in a few minutes:
# tiny models -> synthetic dataset -> BLIP-2 captions -> feature cache -> train DIM (+ a text-only ablation)
# -> full-KB evaluation -> results table and plots.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default outputs/demo; PYTHON=... picks the interpreter)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
PY="${PYTHON:-python}"
OUT="${1:-outputs/demo}"
SEED="${SEED:-0}"
mkdir -p "${OUT}"
t0=$(date +%s)

echo "== [1/7] tiny random-initialised CLIP and BLIP-2 (stand-ins for real weights) -> ${OUT}/models"
[ -d "${OUT}/models/clip" ] && [ -d "${OUT}/models/blip2" ] || \
  "${PY}" "${ROOT}/scripts/make_tiny_models.py" --out "${OUT}/models" --blip2

echo "== [2/7] synthetic MEL dataset -> ${OUT}/data"
[ -f "${OUT}/data/dataset.json" ] || "${PY}" -m data_process.synthetic --out "${OUT}/data" --seed "${SEED}"

echo "== [3/7] BLIP-2 captions for mention images -> ${OUT}/data_cap"
"${PY}" -m data_process.caption --data "${OUT}/data" --out "${OUT}/data_cap" --model "${OUT}/models/blip2" \
  --cache "${OUT}/caption_cache.jsonl" --max-new-tokens 12 --batch-size 32 --quiet

echo "== [4/7] feature cache -> ${OUT}/features"
"${PY}" -m data_process.features --data "${OUT}/data_cap" --out "${OUT}/features" --clip "${OUT}/models/clip"

echo "== [5/7] train DIM (text + image + captions) -> ${OUT}/runs/full"
"${PY}" -m nel_model.train --config "${ROOT}/configs/synthetic.yaml" --features "${OUT}/features" \
  --output_dir "${OUT}/runs/full" --label "DIM (text+image+caption)" --seed "${SEED}" --overwrite

echo "== [6/7] ablation: text only -> ${OUT}/runs/text_only"
"${PY}" -m nel_model.train --config "${ROOT}/configs/synthetic.yaml" --features "${OUT}/features" \
  --output_dir "${OUT}/runs/text_only" --label "text only" --seed "${SEED}" --overwrite \
  --no_image --no_caption --no_entity_image

echo "== [7/7] untrained baseline (zero-shot start of the same model), results table and plots"
"${PY}" -m nel_model.train --config "${ROOT}/configs/synthetic.yaml" --features "${OUT}/features" \
  --output_dir "${OUT}/runs/untrained" --label "untrained (zero-shot)" --seed "${SEED}" --overwrite --epochs 0
"${PY}" "${ROOT}/scripts/make_table.py" "${OUT}/runs/full" "${OUT}/runs/text_only" "${OUT}/runs/untrained" \
  --out "${OUT}/results"
"${PY}" "${ROOT}/scripts/plot_run.py" "${OUT}/runs/full" "${OUT}/runs/text_only" --out "${OUT}/plots"
echo "demo finished in $(( $(date +%s) - t0 )) s: table ${OUT}/results.md, plots ${OUT}/plots/, runs ${OUT}/runs/"
