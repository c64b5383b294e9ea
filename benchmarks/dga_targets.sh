#!/usr/bin/env bash
# DGA on several targets (issue #14, item 4): one generic corpus, three targets, k fine clusters each.
#   bash benchmarks/dga_targets.sh [K ...]        (default: 16 64; run from the repo root inside the project venv)
# Generic corpus: the first 400 documents of the encyclopedia, legal, technical, code and dictionary sources of the
# "domains" corpus (2,000 documents). Targets, none of them in the generic corpus:
#   medical     dictionary entries labelled Med./Anat./... (kept out of the dictionary source by the corpus builder)
#   news        every document of the news source (held out)
#   literature  every document of the literature source (fortunes; held out)
# For each k and target: MiniLM + k-means clusters with the target's histogram (`gradmix cluster --target`, the
# embeddings are cached, so the clustering is the same for every target at one k), then uniform / importance / DGA
# over the config's seeds, 0-4 (`configs/bench_dga.toml`). Extra arguments after `--` go to every `gradmix compare`; the comparison
# folders are runs/bench_dga_<target>_k<K> (prefix: $DGA_RUNS).
set -euo pipefail
KS=()
EXTRA=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; EXTRA=("$@"); break; fi
  KS+=("$1"); shift
done
[ ${#KS[@]} -eq 0 ] && KS=(16 64)
mkdir -p runs
python - <<'PY'
import json
from gradmix_kit.corpora import build_corpus, build_target, load_corpus

build_corpus("domains", max_docs_per_domain=1500)
docs = load_corpus("domains", max_docs_per_domain=1500)
generic = ["encyclopedia", "legal", "technical", "code", "dictionary"]
with open("runs/dga_generic.jsonl", "w") as fh:
    for name in generic:
        for text in docs[name][:400]:
            fh.write(json.dumps({"text": text}) + "\n")
targets = {"medical": build_target("medical"), "news": docs["news"], "literature": docs["literature"]}
for name, texts in targets.items():
    with open(f"runs/dga_target_{name}.jsonl", "w") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    print(f"target {name}: {len(texts)} documents")
PY
for K in "${KS[@]}"; do
  for TARGET in medical news literature; do
    OUT="runs/dga_${TARGET}_k${K}"  # clusters (the same on CPU and GPU)
    gradmix cluster runs/dga_generic.jsonl --k "$K" --coarse-k 4 --target "runs/dga_target_${TARGET}.jsonl" \
      --out "$OUT" --overwrite --quiet
    gradmix compare configs/bench_dga.toml --set "data.corpus=\"$OUT/fine\"" \
      --set "data.target=\"runs/dga_target_${TARGET}.jsonl\"" --out "${DGA_RUNS:-runs/bench_dga}_${TARGET}_k${K}" \
      --no-progress "${EXTRA[@]}"
  done
done
