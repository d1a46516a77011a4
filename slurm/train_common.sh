# Shared body of slurm/train_cnn.sh and slurm/train_vae.sh (sourced, not run).
#
# Inside the job: srun starts one task per rank; each task runs
# `brainage train ... --resume auto`, so every start continues from the newest
# checkpoint in RUN_DIR.
#
# Signals (the trainer's exit codes: 3 = checkpointed after USR1, requeue wanted;
# 128+signum = checkpointed after a stop request, do not requeue):
#   USR1  SLURM sends it to this batch shell --signal's lead before the time limit
#         (--signal=B:USR1@120) or as a preemption warning. We forward it to every
#         task; the trainer checkpoints at the next step boundary and exits 3; we
#         requeue the job, as long as restarts keep saving new checkpoints
#         (MAX_STALLED_REQUEUES restarts in a row without one end the job).
#   TERM  `scancel`, or the time limit itself: the tasks get it too, checkpoint and
#         stop. The job ends and is NOT requeued. Submit the same command again to
#         continue (RUN_DIR does not depend on the job id).
set -uo pipefail

REPO="${BRAINAGE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"   # repo checkout, shared by all nodes
VENV="${VENV:-$REPO/.venv}"                         # python env with brainage-hpc installed
CONFIG_NAME="$(basename "$CONFIG")"; CONFIG_NAME="${CONFIG_NAME%.yaml}"; CONFIG_NAME="${CONFIG_NAME%.yml}"
RUNS_ROOT="${RUNS_ROOT:-$REPO/checkpoints}"
# Same folder for every restart and every resubmission of the same job name + config.
RUN_DIR="${RUN_DIR:-$RUNS_ROOT/${SLURM_JOB_NAME:-brainage}-$CONFIG_NAME}"
OVERRIDES="${OVERRIDES:-}"                           # e.g. "train.epochs=5 data.batch_size=16"
MAX_STALLED_REQUEUES="${MAX_STALLED_REQUEUES:-3}"    # restarts in a row without a new checkpoint
DIST_TIMEOUT_S="${DIST_TIMEOUT_S:-}"                 # process-group timeout (train.dist_timeout_s); a hung rank frees the job after it
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.torch_extensions}"  # DeepSpeed's compiled CPU ops, cached
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"   # one BLAS thread per CPU we own
PY="$VENV/bin/python"

# Rendezvous: the first node of the allocation hosts the process-group master.
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
getent hosts "$MASTER_ADDR" >/dev/null 2>&1 || MASTER_ADDR=127.0.0.1  # test clusters name nodes n1..n4
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

SRUN_WAIT=()
if [ -n "$DIST_TIMEOUT_S" ]; then
    OVERRIDES="$OVERRIDES train.dist_timeout_s=$DIST_TIMEOUT_S"
    margin=$(( DIST_TIMEOUT_S < 60 ? DIST_TIMEOUT_S : 60 ))
    SRUN_WAIT=(--wait=$((DIST_TIMEOUT_S + margin)))   # once one rank has ended, end the others this much later
fi

echo "[$(date +%T)] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: config=$CONFIG run_dir=$RUN_DIR"
echo "[$(date +%T)] to continue this run later: submit the same command again (same --job-name and CONFIG, or RUN_DIR=$RUN_DIR)"
"$PY" -m brainage_hpc.launching.requeue start "$RUN_DIR" || true

SRUN_PID=""
RESEND_PID=""
got_usr1=0
stop_signal=""
resend_usr1() {
    # srun drops signals that come while it is still launching the tasks; the trainer
    # only sets a flag on each USR1, so repeating it until srun ends is harmless.
    while kill -0 "$SRUN_PID" 2>/dev/null; do
        sleep 10
        kill -USR1 "$SRUN_PID" 2>/dev/null
    done
}
on_usr1() {
    echo "[$(date +%T)] batch shell got USR1 ${SECONDS}s after the start: asking the tasks to checkpoint (then requeue)"
    if [ -n "$SRUN_PID" ]; then
        kill -USR1 "$SRUN_PID" 2>/dev/null   # srun forwards USR1 to every task
        if [ "$got_usr1" -eq 0 ]; then resend_usr1 & RESEND_PID=$!; fi
    fi
    got_usr1=1
}
on_stop() {
    stop_signal="$1"
    echo "[$(date +%T)] batch shell got $1 (scancel or the time limit): the tasks checkpoint and stop; no requeue"
    [ -n "$SRUN_PID" ] && kill "-$1" "$SRUN_PID" 2>/dev/null
}
trap on_usr1 USR1
trap 'on_stop TERM' TERM
trap 'on_stop INT' INT

if [ -n "$stop_signal" ] || [ "$got_usr1" -eq 1 ]; then
    rc=3   # a signal before training started: nothing new to save, the requeue guard decides
    [ -n "$stop_signal" ] && rc=$((128 + $(kill -l "$stop_signal")))
else
    # --kill-on-bad-exit=0: one rank leaving first must not kill the others mid-checkpoint.
    srun --kill-on-bad-exit=0 ${SRUN_WAIT[@]+"${SRUN_WAIT[@]}"} "$PY" -u -m brainage_hpc.cli train \
        --config "$CONFIG" --run-dir "$RUN_DIR" --resume auto $OVERRIDES &
    SRUN_PID=$!
    if [ "$got_usr1" -eq 1 ]; then   # USR1 came while srun was starting
        kill -USR1 "$SRUN_PID" 2>/dev/null
        resend_usr1 & RESEND_PID=$!
    fi
fi
# `wait` returns early (128+signal) when a trapped signal arrives: keep waiting for srun,
# and if srun ended while we were in the trap, fetch its own exit status.
while [ -n "$SRUN_PID" ]; do
    wait "$SRUN_PID"
    rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null && continue
    if [ "$rc" -gt 128 ]; then
        wait "$SRUN_PID" 2>/dev/null
        again=$?
        [ "$again" -ne 127 ] && rc=$again
    fi
    break
done
[ -n "$RESEND_PID" ] && kill "$RESEND_PID" 2>/dev/null

requeue=0
if [ -n "$stop_signal" ]; then
    # srun may report 0 for a step it aborted: say how the job really ended
    [ "$rc" -eq 0 ] && rc=$((128 + $(kill -l "$stop_signal")))
    echo "[$(date +%T)] stopped by $stop_signal (exit $rc): not requeueing; submit again to continue from the last checkpoint"
    exit "$rc"
elif [ "$rc" -eq 3 ]; then
    requeue=1
elif [ "$got_usr1" -eq 1 ] && [ "$rc" -gt 128 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; then
    requeue=1   # the signal came before the trainer could catch it: the newest checkpoint is still good
fi
if [ "$requeue" -eq 1 ]; then
    if "$PY" -m brainage_hpc.launching.requeue check "$RUN_DIR" --max-stalled "$MAX_STALLED_REQUEUES"; then
        echo "[$(date +%T)] exit $rc after the checkpoint signal: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "[$(date +%T)] training stopped without requeue (exit $rc)"
    exit 1
fi
echo "[$(date +%T)] training finished with exit code $rc"
exit "$rc"
