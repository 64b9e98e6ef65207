#!/usr/bin/env bash
# RichpediaMEL end to end: convert the raw release, (optionally) enrich and caption, build features, train, evaluate.
# Usage: RICH_DIR=/path/to/release bash rich.sh [--plus] [--captions] [--seed N] [-- train flags]
ROOT="$(cd "$(dirname "$0")" && pwd)"
source "${ROOT}/scripts/pipeline.sh"
run_pipeline rich RichpediaMEL mimic "${ROOT}"/configs/rich.yaml "Download the RichpediaMEL release (MIMIC preprocessed layout: kb_entity.json, RichpediaMEL_train/dev/test.json, kb_image/, mention_images/) and put it in one folder." "$@"
