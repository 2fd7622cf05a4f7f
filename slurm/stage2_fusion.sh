#!/usr/bin/env bash
# Stage 2: fusion. `h3fusion surgery build_moe` builds <run>/fused_init from the base and the
# three experts (one process, skipped when it exists), then `h3fusion fuse --resume` trains the
# MoE under torchrun on every node (NCCL on GPU, gloo on CPU) and writes <run>/fused.
#
#   sbatch slurm/stage2_fusion.sh                          # from the repository root
#   H3F_EP=8 H3F_MOE_BACKEND=megablocks sbatch --nodes=4 slurm/stage2_fusion.sh
#
# Allocation: every #SBATCH value below can be overridden on the sbatch command line
# (`sbatch --nodes=4 --time=2:00:00 --gpus-per-node=4 --partition=gpu ...`) or through sbatch's
# own input variables (SBATCH_TIMELIMIT, SBATCH_GPUS_PER_NODE, SBATCH_PARTITION, SBATCH_SIGNAL).
# CPU-only cluster: `--gpus-per-node=0` (or SBATCH_GPUS_PER_NODE=0).
#
# Launch environment (read by slurm/lib.sh; submit from the repository root or set H3F_REPO):
#   H3F_CONFIG          preset name or YAML path                                  [tiny]
#   H3F_RUN_DIR         run directory; its parent must exist                       [runs/tiny]
#   H3F_SET             space-separated KEY=VALUE config overrides, full dotted keys
#                       (e.g. "fusion.train.max_steps=20 fusion.lambda_gate=0.05")
#   H3F_GPUS_PER_NODE   GPUs = processes per node; 0 = CPU mode (gloo) [the job's --gpus-per-node]
#   H3F_PROCS_PER_NODE  processes per node in CPU mode                              [1]
#   H3F_EP              expert-parallel degree (fusion.ep_degree; must divide the world size)
#   H3F_MOE_BACKEND     torch | megablocks (fusion.moe_backend)
#   H3F_REPO, H3F_VENV  repository root [$SLURM_SUBMIT_DIR] and virtualenv [$H3F_REPO/.venv]
#   H3F_MAX_REQUEUES    give up after this many signal-triggered requeues           [20]
#   H3F_SHUTDOWN_TIMEOUT seconds workers get to checkpoint after USR1               [100]
#
# Preemption: --signal=B:USR1@120 sends USR1 to this batch shell 120 s before the time limit
# (or `scancel --batch --signal=USR1 <job>`); lib.sh forwards it through srun and torchrun to the
# trainers, which checkpoint and exit; the script then runs `scontrol requeue` and the requeued
# job continues with --resume. Finished stages (outputs present) are skipped on every start.
# Outputs: <run>/slurm/<label>-<jobid>/{resolved_config.yaml,git_head,job.env,ranks/node<N>/...}
#SBATCH --job-name=h3f-fusion
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
# Host memory: --mem=0 is all of each node's memory (every job step gets it). build_moe and
# the fusion ranks load the base, the experts and the MoE on the host before the GPUs. For the
# per-node figure run
#   h3fusion plan --config <preset> --nodes N --gpus-per-node G --gpu-mem-gb M --host-mem-gb H
# and where a site refuses --mem=0 submit with it: sbatch --mem=<GB>G slurm/stage2_fusion.sh
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail
H3F_LIB="${H3F_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib.sh"
[ -f "$H3F_LIB" ] || { echo "h3fusion-slurm: error: $H3F_LIB not found: submit from the repository root or set H3F_REPO" >&2; exit 2; }
# shellcheck source=slurm/lib.sh
. "$H3F_LIB"

h3f_init fusion
h3f_stage build_moe
h3f_stage fuse
# training baselines (docs/baselines.md; off unless baselines.* is set): same nodes as fusion
while read -r name; do
    [ -n "$name" ] && h3f_stage "$name"
done < <("$H3F_PYTHON" "$H3F_REPO/slurm/stage_info.py" baselines "$H3F_RESOLVED" "$H3F_RUN_DIR")
