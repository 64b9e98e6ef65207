#!/usr/bin/env bash
# WikiDiverse end to end: convert the raw release, (optionally) enrich and caption, build features, train, evaluate.
# Usage: DIVERSE_DIR=/path/to/release bash diverse.sh [--plus] [--captions] [--seed N] [-- train flags]
ROOT="$(cd "$(dirname "$0")" && pwd)"
source "${ROOT}/scripts/pipeline.sh"
run_pipeline diverse WikiDiverse mimic "${ROOT}"/configs/diverse.yaml "Download the WikiDiverse release (MIMIC preprocessed layout: kb_entity.json, WikiDiverse_train/dev/test.json, kb_image/, mention_image/) and put it in one folder." "$@"
