#!/usr/bin/env bash
# The main job, set-up included: build the default corpus and compare mixing methods on it; prints the report path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
gradmix compare "${1:-configs/main.toml}" --out "${2:-runs/main}"
