#!/usr/bin/env bash
# DGA benchmark data: cluster the generic "domains" corpus into k fine clusters with MiniLM + k-means, assign the
# medical target set to the clusters (importance histogram), then compare uniform / importance / DGA on them.
#   bash benchmarks/dga_clusters.sh [K] [COARSE_K]      (run from the repo root, inside the project venv)
set -euo pipefail
K="${1:-16}"
COARSE="${2:-4}"
OUT="runs/dga_clusters_k${K}"
python - <<PY
from pathlib import Path
import json
from gradmix.corpora import build_corpus, build_target
build_corpus("domains", max_docs_per_domain=1500)
docs = build_target("medical")
Path("runs").mkdir(exist_ok=True)
with open("runs/target_medical.jsonl", "w") as fh:
    for d in docs:
        fh.write(json.dumps({"text": d}) + "\n")
print(len(docs), "target documents")
PY
DATA="${GRADMIX_DATA:-$HOME/.cache/gradmix}"
gradmix cluster "$DATA/domains" --k "$K" --coarse-k "$COARSE" --target runs/target_medical.jsonl \
  --report-k 8,16,32 --out "$OUT" --overwrite
gradmix compare configs/bench_dga.toml --set "data.corpus=\"$OUT/fine\"" --out "runs/bench_dga_k${K}"
