#!/usr/bin/env bash
#SBATCH --job-name=h3f-probe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:05:00
# Test job: the launch code of slurm/lib.sh (h3f_init + h3f_launch) running a gloo all-reduce
# probe on every node. H3F_PROBE_OUT: where each rank writes rank<R>.json.
set -euo pipefail
# shellcheck source=slurm/lib.sh
. "${H3F_REPO:-$SLURM_SUBMIT_DIR}/slurm/lib.sh"
h3f_init probe
[ -n "${H3F_PROBE_OUT:-}" ] || h3f_die "H3F_PROBE_OUT is not set"
h3f_launch "$H3F_REPO/tests/slurm/allreduce_probe.py" "$H3F_PROBE_OUT"
