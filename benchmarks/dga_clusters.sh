#!/usr/bin/env bash
# DGA benchmark data: cluster a generic corpus (the first DOCS documents of each "domains" source) into K fine
# clusters with MiniLM + k-means, assign the medical target set to the clusters (importance histogram), then
# compare uniform / importance / DGA on them.
#   bash benchmarks/dga_clusters.sh [K] [COARSE_K] [DOCS]   (run from the repo root, inside the project venv)
set -euo pipefail
K="${1:-16}"
COARSE="${2:-4}"
DOCS="${3:-400}"
OUT="runs/dga_clusters_k${K}"
python - <<PY
from pathlib import Path
import json
from gradmix_kit.corpora import build_corpus, build_target, load_corpus
build_corpus("domains", max_docs_per_domain=1500)
Path("runs").mkdir(exist_ok=True)
with open("runs/generic_domains.jsonl", "w") as fh:
    for domain, texts in load_corpus("domains", max_docs_per_domain=1500).items():
        for t in texts[:$DOCS]:
            fh.write(json.dumps({"text": t}) + "\n")
docs = build_target("medical")
with open("runs/target_medical.jsonl", "w") as fh:
    for d in docs:
        fh.write(json.dumps({"text": d}) + "\n")
print(len(docs), "target documents")
PY
gradmix cluster runs/generic_domains.jsonl --k "$K" --coarse-k "$COARSE" --target runs/target_medical.jsonl \
  --report-k 8,16,32 --out "$OUT" --overwrite
gradmix compare configs/bench_dga.toml --set "data.corpus=\"$OUT/fine\"" --out "runs/bench_dga_k${K}"
