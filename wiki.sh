#!/usr/bin/env bash
# WikiMEL end to end: convert the raw release, (optionally) enrich and caption, build features, train, evaluate.
# Usage: WIKI_DIR=/path/to/release bash wiki.sh [--plus] [--captions] [--seed N] [-- train flags]
ROOT="$(cd "$(dirname "$0")" && pwd)"
source "${ROOT}/scripts/pipeline.sh"
run_pipeline wiki WikiMEL mimic "${ROOT}"/configs/wiki.yaml "Download the WikiMEL release (MIMIC preprocessed layout: kb_entity.json, WIKIMEL_train/dev/test.json, kb_image/, mention_image/) and put it in one folder." "$@"
