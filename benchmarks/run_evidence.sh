#!/usr/bin/env bash
# Every comparison of BENCHMARKS.md "Evidence" (issue #14), as two lanes of one-thread runs side by side on 2 cores
# (about 2-3 hours on an idle 2-core machine, estimated from the per-run times: BENCHMARKS.md's runs were made in
# pieces). Run from the repo root inside the project venv (scripts/setup_env.sh).
# Logs: runs/evidence_lane_a.log, runs/evidence_lane_b.log.
set -euo pipefail
mkdir -p runs
lane_a() {
  gradmix compare configs/bench_multilingual.toml --out runs/bench_multilingual --no-progress
  gradmix compare configs/bench_pike_regime.toml --out runs/pike_regime --no-progress
  gradmix compare configs/bench_pike_regime.toml --out runs/pike_regime_sweep \
    --methods pike_z03,pike_t50,pike_z003,pike_t10 --seeds 0,1 --no-progress
}
lane_b() {
  bash benchmarks/dga_targets.sh 16 64
  for TK in medical_k16 news_k16 literature_k16 medical_k64; do  # DoGE beside them
    T="${TK%_k*}"
    gradmix compare configs/bench_dga.toml --set "data.corpus=\"runs/dga_${TK}/fine\"" \
      --set "data.target=\"runs/dga_target_${T}.jsonl\"" --methods doge --out "runs/bench_dga_${TK}_doge" --no-progress
  done
  python benchmarks/summarize_dga_targets.py
  python benchmarks/noisy_domain.py --out runs/noisy
}
lane_a > runs/evidence_lane_a.log 2>&1 &
A=$!
lane_b > runs/evidence_lane_b.log 2>&1 &
B=$!
wait "$A"; wait "$B"
echo "evidence runs done: see runs/evidence_lane_*.log"
