#!/usr/bin/env bash
# One more fusion seed of a finished run: the same resolved config, the same stage-1 outputs
# (data, tokenizer, base, the three experts, hard-linked from RUN0), and fusion.train.seed = SEED
# (the fused model, the router-ensemble classifier and the multi-task baselines' fusion-mix rows
# follow it); eval.reuse_from = RUN0/eval, so the models that are bit-identical to RUN0's (base, experts,
# merges, probability-average ensemble) take RUN0's results instead of being evaluated again.
# The headline across seeds is then `h3fusion aggregate --runs RUN0 RUN_1 ...` (docs/results.md).
#
#   tools/sweep/fusion_seed.sh RUN0 RUN_N SEED [extra --set KEY=VALUE ...]
#
# What it does not vary: stage 1 (expert.train.seed stays RUN0's); aggregate.md says so.
# SHARE="baselines/multitask_data_matched baselines/multitask_compute_matched" (space-separated
# run-dir parts) hard-links more of RUN0's outputs: a stage whose output exists is done, so the
# multi-task baselines keep RUN0's data-mix seed and their RUN0 results are reused (the old
# single baseline: about 16 min less per seed on 2 cores). Adding "merges ensembles" (as
# docs/smollm2.md does) also keeps RUN0's prompt-router classifier, so the seeds vary the fused
# model only; the merges and the probability average are the same either way.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 RUN0 RUN_N SEED [--set KEY=VALUE ...]" >&2; exit 2; }
run0=$1; run=$2; seed=$3; shift 3
read -ra h3 <<< "${H3FUSION:-h3fusion}"   # e.g. H3FUSION="python -m pipeline.commands"
[ -f "$run0/resolved_config.yaml" ] && [ -f "$run0/eval/report.json" ] || {
    echo "$0: $run0 is not a finished run (needs resolved_config.yaml and eval/report.json)" >&2; exit 2; }
[[ "$seed" =~ ^[0-9]+$ ]] || { echo "$0: SEED must be a non-negative integer, got '$seed'" >&2; exit 2; }
mkdir -p "$run"
read -ra share <<< "${SHARE:-}"
for part in data tokenizer base experts "${share[@]}"; do
    [ -e "$run/$part" ] && continue
    mkdir -p "$(dirname "$run/$part")"
    [ -d "$run0/$part" ] || { echo "$0: $run0/$part is missing" >&2; exit 2; }
    # hard links: every stage writes a temp dir and renames it, so RUN0's files are never changed
    cp -al "$run0/$part" "$run/$part.tmp" 2>/dev/null || cp -a "$run0/$part" "$run/$part.tmp"
    mv "$run/$part.tmp" "$run/$part"
done
"${h3[@]}" run --config "$run0/resolved_config.yaml" --run-dir "$run" \
    --set fusion.train.seed="$seed" --set eval.seed="$seed" \
    --set eval.reuse_from="$(cd "$run0" && pwd)/eval" "$@"
