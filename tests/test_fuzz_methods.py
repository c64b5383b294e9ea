"""A short run of the method fuzz (benchmarks/fuzz_methods.py; its 10^6-update run is recorded in BENCHMARKS.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz_methods


@pytest.mark.integration
def test_every_method_survives_extreme_statistics_and_round_trips(tmp_path):
    out = tmp_path / "fuzz.json"
    assert fuzz_methods.main(["--updates", "3000", "--roundtrip-every", "250", "--out", str(out)]) == 0
    assert out.is_file()
