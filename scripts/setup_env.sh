#!/usr/bin/env bash
# Create (or reuse) .venv and install gradmix with everything the main job and the tests need.
# Sourced by scripts/main.sh and scripts/test.sh; safe to run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GRADMIX_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ ! -f "$VENV/.gradmix-installed" ] || [ "$ROOT/pyproject.toml" -nt "$VENV/.gradmix-installed" ]; then
  python -m pip install -q --upgrade pip
  # CPU build of torch, pinned here only (an unpinned torch pulls a multi-GB CUDA build); gradmix needs a range.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e "$ROOT[test,cluster,dev]"
  # torchtitan for its integration tests, without its pins: torchtitan 0.3.0 pins datasets < 4.8 and an older
  # huggingface_hub than transformers 5 needs; the parts gradmix uses (dataloader, checkpoint manager) touch neither.
  python -m pip install -q --no-deps "torchtitan==0.3.0" "spmd_types==0.2.3" "torchdata==0.11.0" \
    "torch_checkpointing==0.1.1" "tyro==1.0.17" "typeguard==4.6.1" "docstring_parser==0.18.0"
  touch "$VENV/.gradmix-installed"
fi
# Debian package lists, needed once by the corpus builders (apt-get download of text packages).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
  apt-get update -qq >/dev/null 2>&1 || echo "warning: apt-get update failed; corpus builds may fail" >&2
fi
