#!/usr/bin/env bash
# The test suite, set-up included: unit tests and the marked integration tests (real corpora, torchrun, MiniLM).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m pytest -q -m "integration or not integration" "$@"
