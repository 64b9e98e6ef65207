#!/usr/bin/env bash
# The synthetic MEL demo, end to end on CPU in a few minutes:
# tiny models -> synthetic dataset -> BLIP-2 captions -> feature cache -> train our model (+ a text-only ablation)
# -> full-KB evaluation -> results table, plots and an error analysis (full vs text only).
# Usage: bash scripts/demo.sh [OUT_DIR] [--plus]   (default outputs/demo; PYTHON=... picks the interpreter)
#   --plus  also runs the "+" path offline: the real SmolLM2-135M (llama.cpp server on 127.0.0.1, installed by
#           scripts/build_llama_server.sh) enriches the KB entities, and our model is trained on the enriched
#           features (about 10 more minutes on 2 CPU cores: a 135M model answers ~1 entity per second)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
PLUS=0
POSITIONAL=()
for arg in "$@"; do
  case "${arg}" in
    --plus) PLUS=1;;
    -*) echo "error: unknown flag ${arg} (usage: bash scripts/demo.sh [OUT_DIR] [--plus])" >&2; exit 2;;
    *) POSITIONAL+=("${arg}");;
  esac
done
OUT="${POSITIONAL[0]:-outputs/demo}"
SEED="${SEED:-0}"
mkdir -p "${OUT}"
t0=$(date +%s)

echo "== [1/7] tiny random-initialised CLIP and BLIP-2 (stand-ins for real weights) -> ${OUT}/models"
[ -d "${OUT}/models/clip" ] && [ -d "${OUT}/models/blip2" ] || \
  "${PY}" -m data_process.fixtures.tiny_models --out "${OUT}/models" --blip2

echo "== [2/7] synthetic MEL dataset -> ${OUT}/data"
[ -f "${OUT}/data/dataset.json" ] || "${PY}" -m data_process.fixtures.synthetic --out "${OUT}/data" --seed "${SEED}"

echo "== [3/7] BLIP-2 captions for mention images -> ${OUT}/data_cap"
"${PY}" -m data_process.augment.caption --data "${OUT}/data" --out "${OUT}/data_cap" --model "${OUT}/models/blip2" \
  --cache "${OUT}/caption_cache.jsonl" --max-new-tokens 12 --batch-size 32 --quiet

echo "== [4/7] feature cache -> ${OUT}/features"
"${PY}" -m data_process.encode.features --data "${OUT}/data_cap" --out "${OUT}/features" --clip "${OUT}/models/clip"

echo "== [5/7] train our model (text + image + captions) -> ${OUT}/runs/full"
"${PY}" -m nel_model.train --config "${ROOT}/configs/synthetic.yaml" --features "${OUT}/features" \
  --output-dir "${OUT}/runs/full" --label "ours (text+image+caption)" --seed "${SEED}" --overwrite

echo "== [6/7] ablation: text only -> ${OUT}/runs/text_only"
"${PY}" -m nel_model.train --config "${ROOT}/configs/synthetic.yaml" --features "${OUT}/features" \
  --output-dir "${OUT}/runs/text_only" --label "text only" --seed "${SEED}" --overwrite \
  --no-image --no-caption --no-entity-image

RUNS=("${OUT}/runs/full" "${OUT}/runs/text_only")
if [ "${PLUS}" = 1 ]; then
  PORT="${LLM_PORT:-8765}"
  echo "== [+] LLM enrichment of the KB entities with SmolLM2-135M served on 127.0.0.1:${PORT}"
  PYTHON="${PY}" bash "${ROOT}/scripts/serve_local_llm.sh" "${PORT}" > "${OUT}/llm_server.log" 2>&1 &
  SERVER=$!
  trap 'kill ${SERVER} 2>/dev/null || true' EXIT
  "${PY}" - "${PORT}" <<'PYEOF'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/v1/models"
for _ in range(120):
    try:
        urllib.request.urlopen(url, timeout=2)
        sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit(f"the local LLM server did not start; see its log")
PYEOF
  "${PY}" -m data_process.augment.enrich --data "${OUT}/data_cap" --out "${OUT}/data_plus" --model smollm2-135m-instruct \
    --base-url "http://127.0.0.1:${PORT}/v1" --api-key local --response-format json_object_schema \
    --kinds entities --concurrency 2 --cache "${OUT}/enrich_cache.jsonl"
  kill "${SERVER}" 2>/dev/null || true
  "${PY}" -m data_process.encode.features --data "${OUT}/data_plus" --out "${OUT}/features_plus" --clip "${OUT}/models/clip"
  "${PY}" -m nel_model.train --config "${ROOT}/configs/synthetic.yaml" --features "${OUT}/features_plus" \
    --output-dir "${OUT}/runs/plus" --label "ours+ (+ LLM entity enrichment)" --seed "${SEED}" --overwrite
  RUNS+=("${OUT}/runs/plus")
fi

echo "== [two-stage] retrieve the top 10 with the full run, train the feature re-ranker on them -> ${OUT}/runs/two_stage"
"${PY}" -m nel_model.inference.retrieve --run "${OUT}/runs/full" --top-k 10 > /dev/null
# configs/rerank.yaml's re-ranker (the command's defaults), trained 8 epochs with patience 3 on the demo's small lists
"${PY}" -m nel_model.rerank.train_feature --retriever "${OUT}/runs/full" --output-dir "${OUT}/runs/two_stage" \
  --label "ours + feature re-ranker (K=10)" --seed "${SEED}" --overwrite --threads 1 --epochs 8 --patience 3
RUNS+=("${OUT}/runs/two_stage")
echo "== [evaluate] dim-mel evaluate of the two-stage run: its results.json, recomputed"
"${PY}" -m nel_model.evaluate --run "${OUT}/runs/two_stage" --split test
"${PY}" - "${OUT}" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "data_cap" / "mentions.jsonl").read_text().splitlines()]
test = [{k: r[k] for k in ("id", "sentence", "mention", "gold_id")} for r in rows if r["split"] == "test"][:20]
(out / "to_link.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
PYEOF
echo "== [link] dim-mel link: 20 test mentions as a JSONL, linked by the two-stage system -> ${OUT}/linked.jsonl"
"${PY}" -m nel_model.inference.linker --run "${OUT}/runs/full" --rerank "${OUT}/runs/two_stage" \
  --input "${OUT}/to_link.jsonl" --out "${OUT}/linked.jsonl" --top-k 3

echo "== [7/7] untrained baseline (zero-shot start of the same model), results table, plots, error analysis"
"${PY}" -m nel_model.train --config "${ROOT}/configs/synthetic.yaml" --features "${OUT}/features" \
  --output-dir "${OUT}/runs/untrained" --label "untrained (zero-shot)" --seed "${SEED}" --overwrite --epochs 0
"${PY}" -m nel_model.reporting.tables "${RUNS[@]}" "${OUT}/runs/untrained" --out "${OUT}/results"
"${PY}" -m nel_model.reporting.plots "${OUT}/runs/full" "${OUT}/runs/text_only" --out "${OUT}/plots"
"${PY}" -m nel_model.reporting.analyze --run "${OUT}/runs/full" --compare "${OUT}/runs/text_only" --out "${OUT}/analysis" \
  > /dev/null
echo "demo finished in $(( $(date +%s) - t0 )) s: table ${OUT}/results.md, plots ${OUT}/plots/, error analysis" \
  "${OUT}/analysis.md (full vs text only), runs ${OUT}/runs/"
