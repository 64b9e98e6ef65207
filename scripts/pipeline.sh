#!/usr/bin/env bash
# Shared end-to-end pipeline for the dataset launchers (wiki.sh, rich.sh, diverse.sh, person.sh).
# raw release -> unified records -> [+ LLM enrichment] -> [+ BLIP-2 captions] -> feature cache -> train -> evaluate
#
# Usage (from a launcher): run_pipeline NAME DISPLAY_NAME FORMAT CONFIG DOWNLOAD_HINT "$@"
# Launcher flags:
#   --data DIR        raw release folder (or set the launcher's env var, e.g. WIKIMEL_DIR)
#   --work DIR        where unified data, features and runs go (default: outputs/NAME)
#   --plus            run LLM enrichment and train on the "+" dataset (needs an OpenAI-compatible endpoint:
#                     OPENAI_API_KEY / --llm-base-url / --llm-model)
#   --captions        run BLIP-2 captioning (--blip2 NAME_OR_PATH, default Salesforce/blip2-opt-2.7b)
#   --clip NAME       CLIP for features (default openai/clip-vit-base-patch32)
#   --text-encoder N  optional separate text encoder for the text views
#   --seed N          training seed
#   --preset NAME     train with configs/NAME.yaml instead of the dataset's config; dim_paper = DIM as the paper
#                     describes it (docs/DIVERGENCES.md), feature-step choices included: image regions are person
#                     crops of a detector (--detector NAME_OR_PATH, default facebook/detr-resnet-50); dim_code = DIM
#                     as its public code computes (raw-feature query, pooled context view, in-batch N-pair; the
#                     code uses no regions, so the feature step is the default one)
#   --detector N      object detector for --regions detector (with --preset dim_paper)
#   anything after -- is passed to `python -m nel_model.train`
set -euo pipefail

run_pipeline() {
  local name=$1 display=$2 format=$3 config=$4 hint=$5; shift 5
  local envvar; envvar="$(echo "${name}" | tr '[:lower:]' '[:upper:]')_DIR"
  local data="${!envvar:-}" work="outputs/${name}" plus=0 captions=0 seed=""
  local clip="openai/clip-vit-base-patch32" text_encoder="" blip2="Salesforce/blip2-opt-2.7b"
  local llm_base_url="${OPENAI_BASE_URL:-}" llm_model="" preset="" detector="facebook/detr-resnet-50"
  local -a train_extra=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --data) data=$2; shift 2;;
      --work) work=$2; shift 2;;
      --plus) plus=1; shift;;
      --captions) captions=1; shift;;
      --clip) clip=$2; shift 2;;
      --text-encoder) text_encoder=$2; shift 2;;
      --blip2) blip2=$2; shift 2;;
      --llm-base-url) llm_base_url=$2; shift 2;;
      --llm-model) llm_model=$2; shift 2;;
      --seed) seed=$2; shift 2;;
      --preset) preset=$2; shift 2;;
      --detector) detector=$2; shift 2;;
      --) shift; train_extra=("$@"); break;;
      -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}"; return 0;;
      *) echo "error: unknown flag $1 (see --help)" >&2; return 2;;
    esac
  done
  if [ -z "${data}" ] || [ ! -d "${data}" ]; then
    echo "error: ${name}: raw data folder not found: '${data:-<unset>}'." >&2
    echo "  Set ${envvar}=/path/to/release or pass --data DIR." >&2
    echo "  ${hint}" >&2
    echo "  Expected layout: see docs/DATA.md. No data at hand? Run the synthetic demo: bash scripts/demo.sh" >&2
    return 1
  fi
  local -a feature_flags=()
  if [ -n "${preset}" ]; then
    config="$(dirname "$(dirname "${BASH_SOURCE[0]}")")/configs/${preset}.yaml"
    if [ ! -f "${config}" ]; then
      echo "error: --preset ${preset}: ${config} not found" >&2
      return 2
    fi
    # DIM's image regions: crops of the persons a segmentation model finds (PointRend in the original code)
    [ "${preset}" = dim_paper ] && feature_flags+=(--regions detector --detector "${detector}" --region-labels person)
  fi
  local py="${PYTHON:-python}"
  local unified="${work}/unified" feats="${work}/features" runs="${work}/runs"
  mkdir -p "${work}"

  echo "== [1/5] convert ${format} release -> ${unified}"
  "${py}" -m data_process.ingest.prepare --format "${format}" --src "${data}" --out "${unified}" --dataset-name "${display}"

  local current="${unified}"
  if [ "${plus}" = 1 ]; then
    echo "== [2/5] LLM enrichment -> ${work}/plus"
    local -a llm=()
    [ -n "${llm_model}" ] && llm+=(--model "${llm_model}")   # default: configs/enrich.yaml
    [ -n "${llm_base_url}" ] && llm+=(--base-url "${llm_base_url}")
    "${py}" -m data_process.augment.enrich --data "${current}" --out "${work}/plus" "${llm[@]}"
    current="${work}/plus"
  fi
  if [ "${captions}" = 1 ]; then
    echo "== [3/5] BLIP-2 captions -> ${current}_cap"
    "${py}" -m data_process.augment.caption --data "${current}" --out "${current}_cap" --model "${blip2}"
    current="${current}_cap"
  fi

  echo "== [4/5] features (${clip}) -> ${feats}"
  local -a enc=(--clip "${clip}" "${feature_flags[@]}")
  [ -n "${text_encoder}" ] && enc+=(--text-encoder "${text_encoder}")
  # the views the config's model reads (its views: list; no list: every view)
  "${py}" -m data_process.encode.features --data "${current}" --out "${feats}" --config "${config}" "${enc[@]}"

  # our default model is "ours"; a --preset (the DIM paper's model) is "DIM (PRESET)"; "+": LLM-enriched data
  local label="ours"; [ -n "${preset}" ] && label="DIM"
  [ "${plus}" = 1 ] && label="${label}+"
  [ -n "${preset}" ] && label="${label} (${preset})"
  local run="${runs}/${label// /_}_seed${seed:-default}"
  run="${run//[()]/}"
  echo "== [5/5] train + evaluate -> ${run}"
  local -a t=(--config "${config}" --features "${feats}" --output-dir "${run}" --label "${label}")
  [ -n "${seed}" ] && t+=(--seed "${seed}")
  "${py}" -m nel_model.train "${t[@]}" "${train_extra[@]}"
  "${py}" -m nel_model.reporting.tables "${run}"
}
