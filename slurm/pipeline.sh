#!/usr/bin/env bash
# Submit the whole H3Fusion pipeline as SLURM jobs chained with --dependency=afterok
# (run it on a login node, from anywhere; it is not itself a batch script):
#
#   prepare (stage0: data, tokenizer, base)
#     -> experts (stage1: array 0..E-1, one multi-node job per configured dimension)
#     -> fusion  (stage2: build_moe, then fuse on H3F_NODES nodes)
#     -> eval    (stage3: merge, ensemble, evaluate, profile)
#
#   H3F_CONFIG=llama2-7b H3F_RUN_DIR=/scratch/h3f H3F_NODES=4 slurm/pipeline.sh --partition=gpu
#   H3F_GPUS_PER_NODE=0 H3F_PROCS_PER_NODE=2 slurm/pipeline.sh          # CPU-only cluster
#   slurm/pipeline.sh --dry-run                                          # print, submit nothing
#
# Arguments other than --dry-run are passed to every sbatch (partition, account, qos, ...).
# Environment: everything slurm/stage*.sh read (H3F_CONFIG, H3F_RUN_DIR, H3F_SET, H3F_EP,
# H3F_MOE_BACKEND, H3F_PROCS_PER_NODE, ...; see slurm/lib.sh), plus
#   H3F_NODES           nodes for the experts and fusion jobs            [their #SBATCH --nodes]
#   H3F_GPUS_PER_NODE   GPUs per node for experts/fusion; prepare/eval get min(1, it)
#                       [their #SBATCH --gpus-per-node]; 0 = CPU-only cluster
# The config is resolved once into <run>/resolved_config.yaml (a rerun must give the same
# config) and every job reads that file; job logs go to <run>/slurm/. Prints the four job ids
# (prepare experts fusion eval) on stdout, messages on stderr.
set -euo pipefail
H3F_REPO="${H3F_REPO:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=slurm/lib.sh
. "$H3F_REPO/slurm/lib.sh"

DRY_RUN=0
SBATCH_EXTRA=()
for arg in "$@"; do
    if [ "$arg" = --dry-run ]; then DRY_RUN=1; else SBATCH_EXTRA+=("$arg"); fi
done

submit() {  # submit NAME SBATCH_ARGS... SCRIPT: prints the job id
    local name="$1"
    shift
    if [ "$DRY_RUN" = 1 ]; then
        echo "sbatch --parsable $*" >&2
        echo "<$name>"
        return 0
    fi
    sbatch --parsable "$@" | cut -d';' -f1
}

h3f_setup_python
h3f_check_paths
h3f_collect_overrides_for_pipeline() {  # no allocation yet: the jobs check H3F_EP themselves
    SLURM_NNODES=1 H3F_NPROC="${H3F_EP:-1}" h3f_collect_overrides
}
h3f_collect_overrides_for_pipeline
RESOLVED="$H3F_RUN_DIR/resolved_config.yaml"
device=()  # a CPU-only pipeline of a config that needs CUDA: refused now, not in its fusion job
if [ "${H3F_GPUS_PER_NODE:-}" = 0 ]; then device=(--device=cpu); fi
# hub models (hf: base/tokenizer) are fetched here, on the login node, into the HF cache the
# jobs read (HF_HOME / HF_HUB_CACHE must be on a shared filesystem); compute nodes often have no
# network. A dry run fetches nothing.
fetch=(--fetch-hub)
if [ "$DRY_RUN" = 1 ]; then fetch=(); fi
"$H3F_PYTHON" "$H3F_REPO/slurm/stage_info.py" resolve "$H3F_CONFIG" "$RESOLVED" --must-match \
    "${device[@]}" "${fetch[@]}" "${H3F_OVERRIDES[@]}" || exit 2
mkdir -p "$H3F_RUN_DIR/slurm"
# The jobs read the resolved file; the overrides are already in it.
export H3F_REPO H3F_RUN_DIR H3F_CONFIG="$RESOLVED" H3F_SET=""

common=(--chdir="$H3F_REPO" --kill-on-invalid-dep=yes "${SBATCH_EXTRA[@]}")
multi=()
single=()
if [ -n "${H3F_NODES:-}" ]; then
    h3f_positive_int H3F_NODES "$H3F_NODES"
    multi+=(--nodes="$H3F_NODES")
fi
if [ -n "${H3F_GPUS_PER_NODE:-}" ]; then
    h3f_positive_int H3F_GPUS_PER_NODE "$H3F_GPUS_PER_NODE" 0
    multi+=(--gpus-per-node="$H3F_GPUS_PER_NODE")
    single+=(--gpus-per-node=$(( H3F_GPUS_PER_NODE > 0 ? 1 : 0 )))
fi
# Each job derives its GPU count from its own allocation (prepare/eval get at most one).
unset H3F_GPUS_PER_NODE
logs="$H3F_RUN_DIR/slurm"
one_log=(--output="$logs/%x-%j.out" --error="$logs/%x-%j.err")

prep=$(submit prepare "${common[@]}" "${single[@]}" "${one_log[@]}" "$H3F_REPO/slurm/stage0_prepare.sh")
dims="$("$H3F_PYTHON" "$H3F_REPO/slurm/stage_info.py" dimensions "$RESOLVED")" || exit 2
mapfile -t H3F_DIMS <<<"$dims"
experts=$(submit experts "${common[@]}" "${multi[@]}" --array="0-$((${#H3F_DIMS[@]} - 1))" \
    --dependency="afterok:$prep" \
    --output="$logs/%x-%A_%a.out" --error="$logs/%x-%A_%a.err" "$H3F_REPO/slurm/stage1_experts.sh")
fusion=$(submit fusion "${common[@]}" "${multi[@]}" --dependency="afterok:$experts" \
    "${one_log[@]}" "$H3F_REPO/slurm/stage2_fusion.sh")
evaluation=$(submit eval "${common[@]}" "${single[@]}" --dependency="afterok:$fusion" \
    "${one_log[@]}" "$H3F_REPO/slurm/stage3_eval.sh")

h3f_info "submitted: prepare=$prep experts=$experts fusion=$fusion eval=$evaluation" >&2
h3f_info "config: $RESOLVED; logs: $logs/; watch with: squeue -j $prep,$experts,$fusion,$evaluation" >&2
echo "$prep $experts $fusion $evaluation"
