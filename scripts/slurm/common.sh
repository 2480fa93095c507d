# Shared body of scripts/slurm/*.sbatch (sourced, not run): start one launcher per node with
# srun, pass SLURM's preemption notice (SIGUSR1) on to the training ranks, and requeue the job
# once they have saved a checkpoint, so that the requeued job resumes by itself (--resume auto).
#
# Settings, all optional, from the environment of `sbatch` (exported to the job by default):
#   ZT_ROOT            the zerotrain checkout (default: the directory sbatch was run from)
#   ZT_PYTHON          interpreter (default: $VIRTUAL_ENV/bin/python, else $ZT_ROOT/.venv/bin/python,
#                      else python3)
#   ZT_NPROC_PER_NODE  ranks per node (default: GPUs on the node, SLURM_GPUS_ON_NODE; without GPUs
#                      --cpus-per-task, one CPU rank per CPU; else 1)
#   ZT_MASTER_ADDR     rendezvous host (default: the first node of the allocation)
#   ZT_MASTER_PORT     rendezvous port (default: 20000 + job id % 20000, so jobs sharing a node differ)
#   ZT_MAX_REQUEUES    how often a job the hang watchdog ended (a stalled or lost rank) is requeued
#                      to resume from its latest checkpoint (default 3; counts every restart)

zt_log() { echo "[zerotrain slurm] $*"; }

# Direct children of a process (no procps needed).
zt_children() {
    local status
    for status in $(grep -ls "^PPid:[[:space:]]*$1\$" /proc/[0-9]*/status 2>/dev/null); do
        status=${status#/proc/}
        echo "${status%/status}"
    done
}

# Wait for a background process, through any signals the shell traps meanwhile; its exit status.
zt_wait() {
    while kill -0 "$1" 2>/dev/null; do
        wait "$1"
    done
    wait "$1"
}

# The batch script's body: zt_run LAUNCHER_SCRIPT [ARGS...]
zt_run() {
    local script=$1
    shift
    # The batch shell only runs a trap between commands, so srun runs in the background while the
    # shell waits; SIGUSR1 (sbatch --signal=B:USR1@SECONDS, or scancel --signal=USR1 --batch) is
    # passed to srun, which passes it to every process of the step.
    local preempted=0 srun_pid=""
    zt_on_usr1() {
        preempted=1
        zt_log "SIGUSR1: the ranks save a checkpoint and stop"
        if [ -n "$srun_pid" ]; then
            kill -USR1 "$srun_pid" 2>/dev/null
        fi
    }
    trap zt_on_usr1 USR1
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        echo "zt_run: not inside a SLURM job; submit with:" \
             "sbatch scripts/slurm/$(basename "$script" .py).sbatch ARGS..." >&2
        return 2
    fi
    ZT_ROOT=${ZT_ROOT:-$SLURM_SUBMIT_DIR}
    if [ ! -f "$ZT_ROOT/$script" ]; then
        echo "zt_run: $ZT_ROOT/$script not found: run sbatch from the zerotrain checkout," \
             "or export ZT_ROOT=/path/to/zerotrain" >&2
        return 2
    fi
    cd "$ZT_ROOT" || return 2
    if [ -z "${ZT_PYTHON:-}" ]; then
        if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
            ZT_PYTHON=$VIRTUAL_ENV/bin/python
        elif [ -x "$ZT_ROOT/.venv/bin/python" ]; then
            ZT_PYTHON=$ZT_ROOT/.venv/bin/python
        else
            ZT_PYTHON=$(command -v python3)
        fi
    fi
    # Its environment's tools first (ninja for DeepSpeed's JIT-built ops, the deepspeed command).
    PATH=$(dirname "$ZT_PYTHON"):$PATH
    ZT_NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    if [ -z "${ZT_NPROC_PER_NODE:-}" ]; then
        if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null; then
            ZT_NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
        else
            ZT_NPROC_PER_NODE=${SLURM_CPUS_PER_TASK:-1}
        fi
    fi
    MASTER_ADDR=${ZT_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
    MASTER_PORT=${ZT_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    # The ranks on this node write it when the watchdog ends a stalled job or one that lost a rank.
    ZEROTRAIN_REQUEUE_FILE=${TMPDIR:-/tmp}/zerotrain-requeue-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}
    rm -f "$ZEROTRAIN_REQUEUE_FILE"
    export PATH ZT_ROOT ZT_PYTHON ZT_NNODES ZT_NPROC_PER_NODE MASTER_ADDR MASTER_PORT ZEROTRAIN_REQUEUE_FILE
    # SLURM 22.05 to 23.02: srun no longer inherits --cpus-per-task from the batch allocation.
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    fi

    zt_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $ZT_NNODES node(s) x" \
           "$ZT_NPROC_PER_NODE rank(s), master $MASTER_ADDR:$MASTER_PORT, $ZT_PYTHON $script $*"

    srun --nodes="$ZT_NNODES" --ntasks="$ZT_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        bash "$ZT_ROOT/scripts/slurm/node.sh" "$script" "$@" &
    srun_pid=$!
    if [ "$preempted" = 1 ]; then  # the notice came while this script was starting
        kill -USR1 "$srun_pid" 2>/dev/null
    fi
    zt_wait "$srun_pid"
    local status=$?
    trap - USR1
    if [ "$preempted" = 1 ]; then
        zt_log "training stopped (exit $status); requeueing job $SLURM_JOB_ID to resume from its latest checkpoint"
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            zt_log "could not requeue (submitted without --requeue, or JobRequeue=0?):" \
                   "submit the same command again to resume"
            return 1
        fi
        return 0
    fi
    if [ "$status" != 0 ] && [ -f "$ZEROTRAIN_REQUEUE_FILE" ]; then
        local reason restarts=${SLURM_RESTART_COUNT:-0}
        reason=$(cat "$ZEROTRAIN_REQUEUE_FILE")
        rm -f "$ZEROTRAIN_REQUEUE_FILE"
        if [ "$restarts" -lt "${ZT_MAX_REQUEUES:-3}" ]; then
            zt_log "the watchdog ended training ($reason, exit $status; stacks in the run's hang/ folder);" \
                   "requeueing job $SLURM_JOB_ID to resume from its latest checkpoint" \
                   "(restart $((restarts + 1)) of at most ${ZT_MAX_REQUEUES:-3})"
            scontrol requeue "$SLURM_JOB_ID" && return 0
            zt_log "could not requeue (submitted without --requeue, or JobRequeue=0?)"
        else
            zt_log "the watchdog ended training ($reason, exit $status); not requeued: restarted $restarts" \
                   "time(s) already (ZT_MAX_REQUEUES)"
        fi
    fi
    zt_log "training finished (exit $status)"
    return "$status"
}
