#!/usr/bin/env bash
# WikiPerson end to end: convert the raw release, (optionally) enrich and caption, build features, train, evaluate.
# Usage: PERSON_DIR=/path/to/release bash person.sh [--plus] [--captions] [--seed N] [-- train flags]
ROOT="$(cd "$(dirname "$0")" && pwd)"
source "${ROOT}/scripts/pipeline.sh"
run_pipeline person WikiPerson wikiperson "${ROOT}"/configs/person.yaml "Download the WikiPerson release (kb_entity.json, train/dev/test json files, kb_image/, mention_image/) and put it in one folder." "$@"
