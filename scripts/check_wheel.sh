#!/usr/bin/env bash
# Build the wheel, install it into a fresh venv (torch pinned to the CPU build, from pip's cache after setup_env.sh)
# and import it there: what a user gets from `pip install gradmix`, not the editable checkout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python -m pip wheel -q --no-deps "$ROOT" -w "$WORK/dist"
WHEEL="$(ls "$WORK"/dist/gradmix-*.whl)"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "torch==2.13.0"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL"
cd "$WORK"  # not the checkout: the import must come from the installed wheel
"$WORK/venv/bin/python" - <<'PY'
import sys

import gradmix
from gradmix.methods import make_method

assert "site-packages" in gradmix.__file__, gradmix.__file__
heavy = sorted(m for m in ("transformers", "datasets", "lightning", "trl", "scipy") if m in sys.modules)
assert not heavy, f"import gradmix loaded {heavy}"
weights = make_method("pike", 3).weights
assert abs(weights.sum() - 1) < 1e-12
print(f"wheel OK: gradmix {gradmix.__version__} from {gradmix.__file__}")
PY
echo "wheel: $(basename "$WHEEL")"
