#!/usr/bin/env bash
# The SmolLM2 ablations of docs/tuning.md ("top-k, router + experts, expert training length"), on
# the DEV split over a finished run RUN (stage 1 and the probability-average ensemble are RUN's):
#   OUT/top1, OUT/top3   fusion.top_k = 1 / 3 (build_moe + fuse on RUN's experts)
#   OUT/rx_g01, rx_g1    router + experts trainable (experts at 2e-4, routers at 2e-2), drift
#                        gamma = 0.1 / 1 on every expert (fuse from RUN's fused_init)
#   OUT/lambda10         gating-loss weight 10 (lambda 0 is fusion_ablation.sh's example)
#   OUT/steps96          the router trained twice as long (fusion.train.max_steps = 96)
#   OUT/init_normal,     router init N(0, initializer_range) / prompt hidden-state means
#   OUT/init_prompts     (fusion.router_init; build_moe + fuse on RUN's experts; zeros in the preset)
#   OUT/half, OUT/long   experts trained half / twice as long (expert.train.epochs = 0.5 / 2), then
#                        build_moe, fuse and the ensembles with the run's fusion settings
# then ONE evaluation on dev (OUT/dev/report.md) of the base, RUN's probability average and fused
# model, every ablated model, the half- and double-length ensembles and helpful experts, so every
# difference is paired; OUT/dev_half, OUT/dev_long, OUT/dev_top3 and OUT/dev_init_{normal,prompts}
# pair those fused models with their probability averages.
# Finished stages are skipped on a rerun; REUSE=<earlier dev report dir> takes the models
# it already evaluated from it (eval.reuse_from).
#
#   [REUSE=DIR] tools/sweep/smollm2_ablations.sh RUN OUT
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 RUN OUT" >&2; exit 2; }
run=$(cd "$1" && pwd); out=$2
cfg=$run/resolved_config.yaml
for need in resolved_config.yaml data tokenizer base experts fused_init fused ensembles/avg; do
    [ -e "$run/$need" ] || { echo "$0: $run/$need is missing (RUN must be a finished run)" >&2; exit 2; }
done
read -ra h3 <<< "${H3FUSION:-h3fusion}"   # e.g. H3FUSION="python -m pipeline.commands"
share() {   # hard links: every stage writes a temp dir and renames it, so RUN is never changed
    local dst=$1; shift; mkdir -p "$dst"
    for part in "$@"; do
        [ -e "$dst/$part" ] && continue
        mkdir -p "$(dirname "$dst/$part")"; rm -rf "$dst/$part.tmp"   # a copy cut short never counts
        cp -al "$run/$part" "$dst/$part.tmp" 2>/dev/null || { rm -rf "$dst/$part.tmp"; cp -a "$run/$part" "$dst/$part.tmp"; }
        mv "$dst/$part.tmp" "$dst/$part"
    done
}
ablate() {  # ablate NAME "SHARED PARTS" STAGES... -- --set ...
    local name=$1 parts=$2; shift 2
    local stages=(); while [ "$1" != "--" ]; do stages+=("$1"); shift; done; shift
    share "$out/$name" $parts
    "${h3[@]}" run --config "$cfg" --run-dir "$out/$name" --only "${stages[@]}" "$@"
}
ablate top1 "data tokenizer base experts" build_moe fuse -- --set fusion.top_k=1
ablate top3 "data tokenizer base experts" build_moe fuse -- --set fusion.top_k=3
for g in 0.1 1; do
    ablate "rx_g${g/./}" "data tokenizer base experts fused_init" fuse -- \
        --set fusion.trainable=router+experts --set fusion.train.lr=2.0e-4 --set fusion.router_lr=2.0e-2 \
        --set fusion.gamma.helpful=$g --set fusion.gamma.harmless=$g --set fusion.gamma.honest=$g
done
ablate lambda10 "data tokenizer base experts fused_init" fuse -- --set fusion.lambda_gate=10
ablate steps96 "data tokenizer base experts fused_init" fuse -- --set fusion.train.max_steps=96
for init in normal prompts; do
    ablate "init_$init" "data tokenizer base experts" build_moe fuse -- --set fusion.router_init=$init
done
for length in half:0.5 long:2; do
    ablate "${length%%:*}" "data tokenizer base" expert_helpful expert_harmless expert_honest build_moe fuse ensemble -- \
        --set expert.train.epochs="${length#*:}"
done
reuse=(); [ -n "${REUSE:-}" ] && reuse=(--set eval.reuse_from="$(cd "$REUSE" && pwd)")
"${h3[@]}" evaluate --config "$cfg" --run-dir "$run" --set eval.split=dev "${reuse[@]}" \
    --out "$out/dev" --overwrite --models base="$run/base" ensemble_avg="$run/ensembles/avg" \
    fused="$run/fused" fused_top1="$out/top1/fused" fused_top3="$out/top3/fused" \
    fused_rx_g01="$out/rx_g01/fused" fused_rx_g1="$out/rx_g1/fused" \
    fused_lambda10="$out/lambda10/fused" fused_steps96="$out/steps96/fused" \
    fused_init_normal="$out/init_normal/fused" fused_init_prompts="$out/init_prompts/fused" \
    half_ensemble_avg="$out/half/ensembles/avg" \
    half_fused="$out/half/fused" half_helpful="$out/half/experts/helpful" \
    long_ensemble_avg="$out/long/ensembles/avg" long_fused="$out/long/fused" long_helpful="$out/long/experts/helpful"
# the report pairs every model with the one named `fused`; these put an ablated fused model in
# that seat against its own probability average (every model is reused from OUT/dev)
pair() {
    "${h3[@]}" evaluate --config "$cfg" --run-dir "$run" --set eval.split=dev \
        --set eval.reuse_from="$(cd "$out/dev" && pwd)" --out "$out/dev_$1" --overwrite \
        --models base="$run/base" fused="$2" ensemble_avg="$3"
}
pair half "$out/half/fused" "$out/half/ensembles/avg"
pair long "$out/long/fused" "$out/long/ensembles/avg"
pair top3 "$out/top3/fused" "$run/ensembles/avg"
pair init_normal "$out/init_normal/fused" "$run/ensembles/avg"
pair init_prompts "$out/init_prompts/fused" "$run/ensembles/avg"
echo "reports: $out/dev/report.md, $out/dev_half/report.md, $out/dev_long/report.md, $out/dev_top3/report.md, $out/dev_init_{normal,prompts}/report.md"
