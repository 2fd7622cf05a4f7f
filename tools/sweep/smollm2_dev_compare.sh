#!/usr/bin/env bash
# The SmolLM2 dev comparison of docs/tuning.md ("benign harmless rows, gate tokens"): build a run
# up to the merges, fuse twice (fusion.gate_tokens response / first_response, each in its own run
# dir so neither resumes the other's checkpoint), then ONE evaluation on the DEV split of base,
# the weight average, the harmless expert and both fused models, so every difference is paired.
#
#   tools/sweep/smollm2_dev_compare.sh RUN DATA_DIR [extra --set KEY=VALUE ...]
#
# RUN: a new or partly built run dir (finished stages are skipped); DATA_DIR: ../shared/data.
# Writes RUN (gate_tokens response), RUN.first (links to RUN + its own fused), RUN.dev (report).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 RUN DATA_DIR [--set KEY=VALUE ...]" >&2; exit 2; }
run=$1; d=$2; shift 2
[ -d "$d/safety" ] || { echo "$0: $d has no safety/ folder: DATA_DIR must be ../shared/data" >&2; exit 2; }
h3=${H3FUSION:-h3fusion}; py=${PYTHON:-python}
sets=(--set data.real.alpaca=$d/alpaca/alpaca_small.json
      --set data.real.beavertails=$d/beavertails/beavertails_sample.csv
      --set data.real.truthfulqa=$d/truthfulqa/TruthfulQA.csv
      --set data.real.truthfulqa_mc=$d/truthfulqa/mc_task.json
      --set data.real.alpaca_eval=$d/alpaca_eval/alpaca_eval_text_davinci_003.json
      --set data.real.harmbench=$d/safety/harmbench/harmbench_prompts.txt
      --set data.real.donotanswer=$d/safety/donotanswer
      --set data.real.safety_pairs=$d/safety/response_pairs/objective
      --set data.real.harmless_train_prompts=$d/safety/advbench/adv_bench.prompt
      --set fusion.gate_tokens=response "$@")
"$h3" run --preset smollm2-135m --run-dir "$run" "${sets[@]}" \
    --only data tokenizer base expert_helpful expert_harmless expert_honest build_moe merge fuse
mkdir -p "$run.first"
for part in data tokenizer base experts fused_init; do
    ln -sfn "$(cd "$run" && pwd)/$part" "$run.first/$part"
done
if [ ! -f "$run.first/fused/model.safetensors" ]; then
    "$py" -m pipeline.commands.launch --standalone --nproc-per-node=2 -m pipeline.commands fuse \
        --config "$run/resolved_config.yaml" --run-dir "$run.first" --set fusion.gate_tokens=first_response
fi
"$h3" evaluate --config "$run/resolved_config.yaml" --run-dir "$run" --set eval.split=dev \
    --out "$run.dev" --overwrite --models base="$run/base" merge_average="$run/merges/average" \
    harmless="$run/experts/harmless" fused="$run/fused" fused_first="$run.first/fused"
echo "report: $run.dev/report.md"
