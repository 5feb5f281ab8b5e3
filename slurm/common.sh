# shellcheck shell=bash
# Shared by every sbatch template in slurm/, sourced from ${SSL_HOME:-.}: the folder that
# holds slurm/, i.e. a checkout (the job's working directory by default) or an installed
# package's vitssl/ folder (vitssl.slurm.submit exports SSL_HOME, so the templates of a pip
# install work from any working directory).
#
# The job runs one srun task per GPU; every task is one training process that reads its
# rank from Slurm's variables (train/dist_env.py). The trainer checkpoints and exits with
# EXIT_REQUEUE (75) on SIGUSR1/SIGTERM; the batch shell then requeues the job, which
# reruns this same script and resumes from the latest complete checkpoint.
#
# Settings read from the environment (sbatch exports the submitting shell's environment):
#   SSL_PYTHON      command that runs Python (default: python), e.g. a venv's python or
#                   "apptainer exec --nv image.sif python"; split on spaces.
#   SSL_SRUN_ARGS   extra srun flags, e.g. "--container-image=... --container-mounts=..."
#                   for enroot/pyxis; split on spaces.

EXIT_REQUEUE=75
# Seconds srun lets the other tasks run after the first one exits: a crashed rank takes
# the step down within this time, and ranks that exit on a signal have finished their
# checkpoint (the trainer barriers before exiting), so they are not cut short.
SSL_TASK_EXIT_WAIT=300

ssl_log() {
    echo "[slurm $(date '+%F %T')] $*"
}

# Environment of the training processes, and a start line per (re)start of the job.
ssl_setup() {
    export PYTHONUNBUFFERED=1
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    # A rank that dies or hangs fails the collectives of the others (within the
    # init_process_group timeout) instead of blocking them until the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    ssl_log "job ${SLURM_JOB_ID:-?} start: restart ${SLURM_RESTART_COUNT:-0}," \
        "nodes ${SLURM_JOB_NODELIST:-?}, tasks ${SLURM_NTASKS:-1}, host $(hostname)"
}

# Fail early, with a clear message, when the entry point does not exist (yet). Looks for
# the file, so no Python is needed on the host (containers): vitssl.* under SSL_HOME, any
# other module (SSL_ENTRY) under the working directory.
ssl_require_module() {
    local module=$1 path
    path=${module//.//}
    case $module in
    vitssl.*) path="${SSL_HOME:-.}/${path#vitssl/}" ;;
    esac
    if [ ! -f "$path.py" ] && [ ! -f "$path/__main__.py" ]; then
        ssl_log "python -m $module is not available here (no $path.py)"
        exit 1
    fi
}

# Warn when the run directory comes from the recipe: it must be unique per run, since a
# requeued job (and any other job using it) resumes from the checkpoints found there.
ssl_check_output_dir() {
    local arg
    for arg in "$@"; do
        case $arg in train.output_dir=*) return 0 ;; esac
    done
    ssl_log "warning: no train.output_dir=... override; the recipe's run directory is used" \
        "and this job resumes from any checkpoint already there"
}

# Forward a signal that reached the batch shell to the srun step (srun passes it on to
# every task). With --signal=USR1@T (no B:) Slurm signals the tasks itself; this covers
# --signal=B:USR1@T and `scancel --batch --signal=USR1`. SIGTERM reaches the batch shell
# when Slurm ends the job (scancel, preemption, time limit): the trainer still saves a
# checkpoint, but the job must not requeue itself then (Slurm would let it: `scontrol
# requeue` also takes a job that is being cancelled).
ssl_forward() {
    local sig=$1
    ssl_log "batch shell got SIG$sig; forwarding it to the training step"
    if [ "$sig" = TERM ]; then
        SSL_TERMINATED=1
    fi
    if [ -n "${SSL_STEP_PID:-}" ]; then
        kill -s "$sig" "$SSL_STEP_PID" 2>/dev/null || true
    fi
}

# Run "$@" as one task per allocated task slot (one per GPU) and return its exit code.
ssl_srun() {
    local srun_args rc=0
    read -r -a srun_args <<<"${SSL_SRUN_ARGS:-}"
    SSL_STEP_PID=""
    SSL_TERMINATED=0
    trap 'ssl_forward USR1' USR1
    trap 'ssl_forward TERM' TERM
    srun --kill-on-bad-exit=0 --wait="$SSL_TASK_EXIT_WAIT" \
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "${srun_args[@]}" "$@" &
    SSL_STEP_PID=$!
    # A trapped signal interrupts `wait`; wait again until srun is really gone, then
    # `wait` once more returns its saved exit status.
    while kill -0 "$SSL_STEP_PID" 2>/dev/null; do
        wait "$SSL_STEP_PID" || true
    done
    wait "$SSL_STEP_PID" || rc=$?
    trap - USR1 TERM
    return "$rc"
}

# Exit the batch script after a step that ended with "$1": requeue on EXIT_REQUEUE.
ssl_finish() {
    local rc=$1
    if [ "$rc" -eq "$EXIT_REQUEUE" ] && [ "${SSL_TERMINATED:-0}" = 1 ]; then
        ssl_log "training stopped at a checkpoint, but Slurm is ending this job" \
            "(cancelled, preempted or out of time): not requeueing; resubmit to resume"
        exit "$rc"
    fi
    if [ "$rc" -eq "$EXIT_REQUEUE" ]; then
        ssl_log "training stopped at a checkpoint (exit $rc); requeueing job $SLURM_JOB_ID"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        ssl_log "scontrol requeue failed; resubmit the same command to resume"
        exit "$rc"
    fi
    ssl_log "step finished with exit code $rc"
    exit "$rc"
}

# The whole batch step: python -m MODULE ARGS..., one task per GPU, requeue on exit 75.
ssl_main() {
    local module=$1 python rc=0
    shift
    ssl_setup
    ssl_require_module "$module"
    read -r -a python <<<"${SSL_PYTHON:-python}"
    ssl_srun "${python[@]}" -m "$module" "$@" || rc=$?
    ssl_finish "$rc"
}

# Line $2 (0-based) of sweep file $1, not counting blank lines and # comments.
ssl_sweep_line() {
    local file=$1 index=$2 line
    if [ ! -f "$file" ]; then
        ssl_log "sweep file $file not found" >&2
        return 1
    fi
    line=$(grep -v -E '^[[:space:]]*(#|$)' "$file" | sed -n "$((index + 1))p")
    if [ -z "$line" ]; then
        ssl_log "sweep file $file has no line $index (array index out of range)" >&2
        return 1
    fi
    echo "$line"
}
