# shellcheck shell=bash
# Shared launch logic for slurm/stage*.sh (sourced, never run). See docs/slurm.md.
#
# A stage script calls, in order:
#   h3f_init <job-label>     checks inputs (fail fast, one message, before any srun), resolves
#                            the config, writes provenance, picks GPU/CPU mode and the master
#   h3f_stage <stage>        runs one stage of pipeline/stages.py (skipped when its outputs
#                            exist): torchrun on every node for training, one process otherwise
#   h3f_launch <args...>     lower level: `torchrun <args...>` on every node of the job
#
# Environment read here (all optional; the stage scripts document them too):
#   H3F_REPO            repository root                      [$SLURM_SUBMIT_DIR]
#   H3F_VENV            virtualenv to activate               [$H3F_REPO/.venv when present]
#   H3F_CONFIG          preset name or YAML path             [tiny]
#   H3F_RUN_DIR         run directory (its parent must exist) [$H3F_REPO/runs/tiny]
#   H3F_SET             space-separated KEY=VALUE overrides, full dotted keys (fusion.top_k=2)
#   H3F_GPUS_PER_NODE   GPUs (= processes) per node; 0 = CPU [the job's --gpus-per-node/--gres, else 0]
#   H3F_PROCS_PER_NODE  processes per node in CPU mode      [1]
#   H3F_EP              expert-parallel degree  -> fusion.ep_degree
#   H3F_MOE_BACKEND     torch | megablocks      -> fusion.moe_backend
#   H3F_MAX_REQUEUES    stop requeueing after this many restarts [20]
#   H3F_SHUTDOWN_TIMEOUT seconds torchrun waits for workers to checkpoint after a signal [100]
#
# Exported to every step: H3F_DEVICE=cuda (GPU mode) or cpu (CPU mode), which pipeline.env reads:
# in GPU mode a process whose torch cannot use CUDA stops with one error, never falls back to
# CPU (h3f_init checks it here first, before any srun). GPU mode also defaults NCCL_DEBUG=WARN;
# other NCCL_* / TORCH_NCCL_* settings pass through untouched (docs/slurm.md, "NCCL").

H3F_PREEMPTED=0        # set by the USR1 trap
H3F_STEP_PID=""        # the srun of the running step (signals are forwarded to it)

h3f_die() {  # one clear line in the job's error log, then stop before anything else runs
    echo "h3fusion-slurm: error: $*" >&2
    exit 2
}

h3f_info() { echo "h3fusion-slurm: $*"; }

h3f_positive_int() {  # h3f_positive_int NAME VALUE [MIN]
    if ! [[ "$2" =~ ^[0-9]+$ ]] || [ "$2" -lt "${3:-1}" ]; then
        h3f_die "$1=$2: expected an integer >= ${3:-1}"
    fi
}

h3f_check_slurm() {
    [ -n "${SLURM_JOB_ID:-}" ] || h3f_die "not inside a SLURM job: submit with sbatch (see docs/slurm.md)"
    command -v scontrol >/dev/null || h3f_die "scontrol not found on $(hostname)"
}

h3f_setup_python() {
    H3F_REPO="${H3F_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
    [ -f "$H3F_REPO/pipeline/commands/__init__.py" ] || h3f_die "H3F_REPO=$H3F_REPO is not the h3fusion repository (no pipeline/commands/__init__.py)"
    cd "$H3F_REPO" || h3f_die "cannot cd to H3F_REPO=$H3F_REPO"
    local venv="${H3F_VENV:-$H3F_REPO/.venv}"
    if [ -f "$venv/bin/activate" ]; then
        # shellcheck source=/dev/null
        . "$venv/bin/activate"
    elif [ -n "${H3F_VENV:-}" ]; then
        h3f_die "H3F_VENV=$H3F_VENV has no bin/activate"
    fi
    H3F_PYTHON="$(command -v python3 || command -v python)" || h3f_die "no python3 on PATH"
    export H3F_REPO H3F_PYTHON PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
}

h3f_check_paths() {
    H3F_CONFIG="${H3F_CONFIG:-tiny}"
    case "$H3F_CONFIG" in
        */* | *.yaml | *.yml)
            [ -f "$H3F_CONFIG" ] || h3f_die "H3F_CONFIG=$H3F_CONFIG: config file not found" ;;
    esac
    H3F_RUN_DIR="${H3F_RUN_DIR:-$H3F_REPO/runs/tiny}"
    local parent
    parent="$(dirname -- "$H3F_RUN_DIR")"
    [ -d "$parent" ] || h3f_die "H3F_RUN_DIR=$H3F_RUN_DIR: parent directory $parent does not exist"
    mkdir -p -- "$H3F_RUN_DIR" 2>/dev/null || h3f_die "H3F_RUN_DIR=$H3F_RUN_DIR: cannot create it"
    H3F_RUN_DIR="$(cd -- "$H3F_RUN_DIR" && pwd)"
    export H3F_RUN_DIR
}

h3f_visible_gpus() {  # number of GPUs this (first) node can see
    if [ -n "${CUDA_VISIBLE_DEVICES+x}" ] && [ -z "${CUDA_VISIBLE_DEVICES}" ]; then echo 0; return; fi
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

h3f_pick_devices() {  # GPU mode: one process per GPU and NCCL; CPU mode: gloo
    # Default: what the allocation granted (--gpus-per-node or --gres), 0 = CPU mode.
    local visible requested="${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
    visible="$(h3f_visible_gpus)"
    requested="${requested##*:}"  # "a100:4" -> "4"
    H3F_GPUS_PER_NODE="${H3F_GPUS_PER_NODE:-$requested}"
    h3f_positive_int H3F_GPUS_PER_NODE "$H3F_GPUS_PER_NODE" 0
    if [ "$H3F_GPUS_PER_NODE" -gt "$visible" ]; then
        h3f_die "H3F_GPUS_PER_NODE=$H3F_GPUS_PER_NODE GPUs requested but node ${SLURMD_NODENAME:-$(hostname)} has $visible visible: submit to a GPU partition with --gpus-per-node, or set H3F_GPUS_PER_NODE=0 for CPU"
    fi
    if [ "$H3F_GPUS_PER_NODE" -gt 0 ]; then
        H3F_NPROC="$H3F_GPUS_PER_NODE"
        # cuda: pipeline.env refuses a silent CPU fallback (checked in h3f_write_provenance);
        # DS_ACCELERATOR=cuda: a DS_ACCELERATOR=cpu left in the submitting shell must not win
        export H3F_DEVICE=cuda DS_ACCELERATOR=cuda NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    else
        H3F_NPROC="${H3F_PROCS_PER_NODE:-1}"
        h3f_positive_int H3F_PROCS_PER_NODE "$H3F_NPROC"
        # pipeline.env.dist_backend -> gloo, DeepSpeed on its CPU accelerator
        export H3F_DEVICE=cpu DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
    fi
    local cpus="${SLURM_CPUS_PER_TASK:-1}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cpus / H3F_NPROC > 0 ? cpus / H3F_NPROC : 1 ))}"
    export H3F_NPROC H3F_GPUS_PER_NODE
}

h3f_collect_overrides() {  # H3F_SET + the named knobs -> array H3F_OVERRIDES (full dotted keys)
    H3F_OVERRIDES=()
    local item items=()
    read -r -a items <<<"${H3F_SET:-}"  # split on blanks, no glob expansion
    for item in "${items[@]}"; do
        [[ "$item" == *=* ]] || h3f_die "H3F_SET item '$item': expected KEY=VALUE"
        H3F_OVERRIDES+=("$item")
    done
    if [ -n "${H3F_EP:-}" ]; then
        h3f_positive_int H3F_EP "$H3F_EP"
        [ $(( SLURM_NNODES * H3F_NPROC % H3F_EP )) -eq 0 ] ||
            h3f_die "H3F_EP=$H3F_EP does not divide the world size $SLURM_NNODES nodes x $H3F_NPROC procs"
        H3F_OVERRIDES+=("fusion.ep_degree=$H3F_EP")
    fi
    if [ -n "${H3F_MOE_BACKEND:-}" ]; then
        H3F_OVERRIDES+=("fusion.moe_backend=$H3F_MOE_BACKEND")
    fi
}

h3f_write_provenance() {  # <run>/slurm/<label>-<jobid>/{resolved_config.yaml,git_head,job.env}
    H3F_JOB_DIR="$H3F_RUN_DIR/slurm/$1-${SLURM_JOB_ID}"
    mkdir -p "$H3F_JOB_DIR" || h3f_die "cannot create $H3F_JOB_DIR"
    H3F_RESOLVED="$H3F_JOB_DIR/resolved_config.yaml"
    # --device: GPU mode needs a torch that sees $H3F_NPROC GPUs here (not a CPU-only build, not
    # hidden by CUDA_VISIBLE_DEVICES, a driver new enough); CPU mode a config that needs no CUDA
    "$H3F_PYTHON" "$H3F_REPO/slurm/stage_info.py" resolve "$H3F_CONFIG" "$H3F_RESOLVED" \
        --device="$H3F_DEVICE:$H3F_NPROC" "${H3F_OVERRIDES[@]}" ||
        exit 2  # stage_info printed the one-line reason
    git -C "$H3F_REPO" rev-parse HEAD >"$H3F_JOB_DIR/git_head" 2>/dev/null || echo unknown >"$H3F_JOB_DIR/git_head"
    {
        echo "job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NODELIST"
        echo "nproc_per_node=$H3F_NPROC gpus_per_node=$H3F_GPUS_PER_NODE device=$H3F_DEVICE config=$H3F_CONFIG"
        echo "step_options=${H3F_STEP_OPTS[*]}"
        echo "overrides=${H3F_OVERRIDES[*]}"
    } >>"$H3F_JOB_DIR/job.env"
    export H3F_JOB_DIR H3F_RESOLVED
}

h3f_master() {  # MASTER_ADDR: first node's NodeAddr (emulated node names do not resolve)
    local first addr
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    addr="$(scontrol show node "$first" | grep -o 'NodeAddr=[^ ]*' | head -n 1 | cut -d= -f2)"
    export MASTER_ADDR="${addr:-$first}"
    # A port per job id: jobs sharing a node do not collide; a requeued job reuses its port.
    export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
}

h3f_step_options() {  # srun options a job step does not inherit from the batch allocation
    # Since Slurm 22.05 srun ignores SLURM_CPUS_PER_TASK (sbatch --cpus-per-task): pass it again,
    # else a task counts as one CPU (and task/affinity binds it to one). Memory: srun reads SLURM_MEM_PER_{GPU,NODE,CPU} itself
    # (whichever sbatch set: --mem-per-gpu, --mem, --mem-per-cpu; none for --mem=0, when a step
    # gets all of the job's memory); passed explicitly as well so the step line shows it.
    H3F_STEP_OPTS=()
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then H3F_STEP_OPTS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
    if [ -n "${SLURM_MEM_PER_GPU:-}" ]; then H3F_STEP_OPTS+=(--mem-per-gpu="$SLURM_MEM_PER_GPU")
    elif [ -n "${SLURM_MEM_PER_NODE:-}" ]; then H3F_STEP_OPTS+=(--mem="$SLURM_MEM_PER_NODE")
    elif [ -n "${SLURM_MEM_PER_CPU:-}" ]; then H3F_STEP_OPTS+=(--mem-per-cpu="$SLURM_MEM_PER_CPU")
    fi
}

h3f_init() {  # h3f_init LABEL: every check, then provenance; nothing has started yet
    h3f_check_slurm
    h3f_setup_python
    h3f_check_paths
    h3f_pick_devices
    h3f_step_options
    h3f_collect_overrides
    h3f_write_provenance "$1"
    h3f_master
    H3F_REQUEUE_CODE="$("$H3F_PYTHON" -c 'from pipeline.env import requeue_requested_exit_code as c; print(c())')"
    trap h3f_on_usr1 USR1
    h3f_info "job $SLURM_JOB_ID ($1) on $SLURM_JOB_NODELIST: $SLURM_NNODES node(s) x $H3F_NPROC proc(s)" \
        "($H3F_DEVICE), master $MASTER_ADDR:$MASTER_PORT, run dir $H3F_RUN_DIR," \
        "restart ${SLURM_RESTART_COUNT:-0}, step options: ${H3F_STEP_OPTS[*]:-none}"
}

# ----------------------------------------------------------------------------- running steps

h3f_on_usr1() {  # SLURM's --signal=B:USR1@120 reaches this (batch) shell only
    H3F_PREEMPTED=1
    h3f_info "USR1: time limit or preemption ahead; asking the running step to checkpoint"
    # srun forwards USR1 to its tasks (torchrun), which forward it to the workers.
    if [ -n "$H3F_STEP_PID" ]; then kill -USR1 "$H3F_STEP_PID" 2>/dev/null || true; fi
}

h3f_wait_step() {  # wait for the background srun; a trap interrupts `wait`, so wait again
    while kill -0 "$H3F_STEP_PID" 2>/dev/null; do
        wait "$H3F_STEP_PID" || true
    done
    local rc=0
    wait "$H3F_STEP_PID" || rc=$?
    H3F_STEP_PID=""
    return "$rc"
}

h3f_launch() {  # h3f_launch ARGS...: one torchrun per node (c10d rendezvous), ARGS = its script
    # torchrun runs under pipeline.commands.launch (as under `h3fusion run`): it exits 85 when
    # the ranks checkpointed on a signal and asked for a requeue (torchrun alone exits 1 then),
    # and it adds torchrun's signal forwarding and shutdown timeout (H3F_SHUTDOWN_TIMEOUT, read
    # through pipeline.env.shutdown_timeout) where the installed torchrun has those options.
    export H3F_RANK_LOG_DIR="$H3F_JOB_DIR/ranks" H3F_SHUTDOWN_TIMEOUT="${H3F_SHUTDOWN_TIMEOUT:-100}"
    # Single quotes on purpose: $SLURM_NODEID must expand on each node, not here (else every
    # node would be node 0). Node 0 hosts the rendezvous store; the others connect to it.
    # shellcheck disable=SC2016
    # --wait instead of --kill-on-bad-exit: after a signal the nodes' torchruns end a moment
    # apart, and killing the later ones would cut their workers' checkpoint short; a node whose
    # peers crashed is still stopped, H3F_SHUTDOWN_TIMEOUT + 30 s after the first one ended.
    srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 "${H3F_STEP_OPTS[@]}" \
        --kill-on-bad-exit=0 --wait=$((H3F_SHUTDOWN_TIMEOUT + 30)) --label bash -c '
        is_host=0; [ "$SLURM_NODEID" = 0 ] && is_host=1
        addr="$(scontrol show node "$SLURMD_NODENAME" | grep -o "NodeAddr=[^ ]*" | cut -d= -f2)"
        exec "$H3F_PYTHON" -m pipeline.commands.launch --nnodes="$SLURM_NNODES" \
            --nproc-per-node="$H3F_NPROC" --rdzv-backend=c10d --local-addr="${addr:-$(hostname)}" \
            --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
            --rdzv-conf="is_host=$is_host" --max-restarts=0 \
            --log-dir="$H3F_RANK_LOG_DIR/node$SLURM_NODEID" --tee=3 "$@"' h3f-node "$@" &
    H3F_STEP_PID=$!
    h3f_wait_step
}

h3f_run_single() {  # h3f_run_single ARGS...: `h3fusion ARGS` as one process on the first node
    srun --nodes=1 --ntasks=1 "${H3F_STEP_OPTS[@]}" --label "$H3F_PYTHON" -m pipeline.commands "$@" &
    H3F_STEP_PID=$!
    h3f_wait_step
}

h3f_requeue() {  # h3f_requeue WHY [STAGE]: back into the queue; STAGE resumes from its checkpoint
    local restarts="${SLURM_RESTART_COUNT:-0}" max="${H3F_MAX_REQUEUES:-20}"
    [ "$restarts" -lt "$max" ] ||
        h3f_die "$1; not requeueing again after $restarts restarts (H3F_MAX_REQUEUES=$max)"
    # The marker makes the next start pass --resume, which insists on the checkpoint: a stage
    # that was stopped by a signal must continue, never silently start over.
    if [ -n "${2:-}" ]; then touch "$H3F_JOB_DIR/resume.$2"; fi
    h3f_info "$1: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    scontrol requeue "$SLURM_JOB_ID" ||
        h3f_die "scontrol requeue $SLURM_JOB_ID failed (submit with --requeue)"
    exit 0
}

h3f_stage_argv() {  # h3f_stage_argv NAME: the stage's h3fusion argv (from pipeline/stages.py)
    "$H3F_PYTHON" "$H3F_REPO/slurm/stage_info.py" argv "$H3F_RESOLVED" "$H3F_RUN_DIR" "$1"
}

h3f_stage() {  # h3f_stage NAME [EXTRA_ARGS...]: run a stage of pipeline/stages.py unless done
    local name="$1" text rc=0
    shift
    if "$H3F_PYTHON" "$H3F_REPO/slurm/stage_info.py" "done" "$H3F_RESOLVED" "$H3F_RUN_DIR" "$name"; then
        h3f_info "stage $name: outputs exist, skipped"
        return 0
    fi
    [ "$H3F_PREEMPTED" = 0 ] || h3f_requeue "signal before stage $name"
    text="$(h3f_stage_argv "$name")" || exit 2
    local argv=()
    mapfile -t argv <<<"$text"
    local trainer=""  # training stages run on every node and can resume from a checkpoint
    case "${argv[0]}" in train-expert | train-baseline | fuse) trainer="$name" ;; esac
    if [ -n "$trainer" ] && [ -f "$H3F_JOB_DIR/resume.$name" ]; then argv+=(--resume); fi
    h3f_info "stage $name: h3fusion ${argv[*]} $*"
    if [ -n "$trainer" ]; then
        h3f_launch -m pipeline.commands "${argv[@]}" "$@" || rc=$?
    else
        h3f_run_single "${argv[@]}" "$@" || rc=$?
    fi
    [ "$rc" -eq 0 ] && { h3f_info "stage $name: done"; return 0; }
    if [ "$H3F_PREEMPTED" = 1 ] || [ "$rc" -eq "$H3F_REQUEUE_CODE" ]; then
        h3f_requeue "stage $name stopped by a signal (exit $rc)" "$trainer"
    fi
    h3f_die "stage $name failed with exit status $rc (per-rank logs: $H3F_JOB_DIR/ranks)"
}
