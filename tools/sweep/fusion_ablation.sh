#!/usr/bin/env bash
# One fusion ablation on DEV over a finished run (docs/tuning.md, "ablations"): fuse again into
# RUN.NAME with the run's resolved config plus the given --set overrides (fusion-loop keys only:
# fusion.lambda_gate, fusion.gamma.*, fusion.trainable, fusion.gate_tokens, ...; the MoE is the
# run's fused_init, so fusion.top_k / router_init cannot change here), then one paired dev
# evaluation of base, weight average, harmless expert and the ablated model. With
# REUSE=<earlier dev report dir>, models it already evaluated are taken from it (eval.reuse_from).
#
#   [REUSE=DIR] tools/sweep/fusion_ablation.sh RUN NAME --set fusion.lambda_gate=0 [...]
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 RUN NAME --set KEY=VALUE [...]" >&2; exit 2; }
run=$(cd "$1" && pwd); name=$2; shift 2
[ -f "$run/resolved_config.yaml" ] && [ -d "$run/fused_init" ] || {
    echo "$0: $run needs resolved_config.yaml and fused_init (run it up to build_moe)" >&2; exit 2; }
read -ra h3 <<< "${H3FUSION:-h3fusion}"; py=${PYTHON:-python}
out="$run.$name"
mkdir -p "$out"
for part in data tokenizer base experts fused_init; do ln -sfn "$run/$part" "$out/$part"; done
if [ ! -f "$out/fused/model.safetensors" ]; then
    "$py" -m pipeline.commands.launch --standalone --nproc-per-node=2 -m pipeline.commands fuse \
        --config "$run/resolved_config.yaml" --run-dir "$out" "$@"
fi
reuse=(); [ -n "${REUSE:-}" ] && reuse=(--set eval.reuse_from="$REUSE")
"${h3[@]}" evaluate --config "$run/resolved_config.yaml" --run-dir "$run" --set eval.split=dev \
    "${reuse[@]}" --out "$out.dev" --overwrite --models base="$run/base" \
    merge_average="$run/merges/average" harmless="$run/experts/harmless" "fused_$name=$out/fused"
echo "report: $out.dev/report.md"
