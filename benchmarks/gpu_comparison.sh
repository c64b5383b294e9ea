#!/usr/bin/env bash
# The evidence comparisons (BENCHMARKS.md "Evidence") at GPU scale: an 11M-parameter GPT (d_model 384, 6 layers,
# 6 heads; the CPU runs use 0.43M), 4x larger batches, otherwise the same configs (corpora, methods, seeds, method
# settings). Nothing in gradmix depends on a GPU; this script is for when one is available.
#
#   bash benchmarks/gpu_comparison.sh            # on a machine with a CUDA GPU (~1-2 h on one modern GPU)
#   bash benchmarks/gpu_comparison.sh --dry-run  # the same commands on CPU for 3 steps and one seed (checks the setup)
#
# Set-up on the GPU machine: `bash scripts/setup_env.sh`, then replace the CPU torch in .venv by a CUDA build of the
# same version (torch==2.13.0 for your CUDA), then run this script from the repo root inside .venv.
# Results: runs/gpu_* (comparison.md and report.html in each) and benchmarks/results/probe_cost_cuda.json.
set -euo pipefail
DEVICE=cuda
LIMIT=()
if [ "${1:-}" = "--dry-run" ]; then
  DEVICE=cpu
  LIMIT=(--set steps=3 --set train.eval_every=3 --seeds 0)
fi
SCALE=(--set "device=\"$DEVICE\"" --set threads=8 --set model.d_model=384 --set model.n_layers=6
       --set model.n_heads=6 --set train.lr=1e-3 --set train.eval_windows_per_domain=128)
mkdir -p runs
gradmix compare configs/bench_multilingual.toml "${SCALE[@]}" --set train.batch_size=64 --set steps=2000 \
  --out runs/gpu_multilingual --no-progress "${LIMIT[@]}"
gradmix compare configs/bench_pike_regime.toml "${SCALE[@]}" --set train.batch_size=256 --set steps=1000 \
  --out runs/gpu_pike_regime --no-progress "${LIMIT[@]}"
python benchmarks/noisy_domain.py --out runs/gpu_noisy "${SCALE[@]}" --set train.batch_size=256 --set steps=1000 \
  $( [ "$DEVICE" = cpu ] && echo "--set steps=3 --set train.eval_every=3 --seeds 0" )
DGA_RUNS=runs/gpu_dga bash benchmarks/dga_targets.sh 16 64 -- "${SCALE[@]}" --set train.batch_size=64 --set mixing.target_batch_size=64 \
  --set steps=2000 "${LIMIT[@]}"
if [ "$DEVICE" = cuda ]; then
  python benchmarks/bench_probe_cost.py --device cuda --json benchmarks/results/probe_cost_cuda.json
fi
