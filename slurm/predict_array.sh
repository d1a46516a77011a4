#!/bin/bash
# Score a cohort with a trained model as a SLURM job array.
#
#   CHECKPOINT=checkpoints/sfcn INPUT=/data/bids OUT=/scratch/$USER/pred.csv sbatch slurm/predict_array.sh
#   CHECKPOINT=model.onnx INPUT="cohort.csv" OUT=pred.csv sbatch --array=0-15 --cpus-per-task=8 slurm/predict_array.sh
#
# Task i of K (K = highest array index + 1; keep the array 0..K-1) scores its slice
# of the plan into OUT.parts/part-<i>-of-<K>.jsonl; the task that completes the plan
# merges everything into OUT (one row per scan) and writes OUT_report.md/.png.
# Merge by hand at any time with `brainage predict --merge --out OUT`: it names the
# missing parts and the scans not scored yet.
#
# The time limit or a preemption warning (USR1, 120 s before) stops a task between
# batches and requeues it; `scancel` (SIGTERM) stops it without requeue. Submitting
# the same command again after a failure continues: scored scans are skipped.
#
# Submit from the repository root (or set BRAINAGE_HOME). Environment (default):
#   CHECKPOINT     run folder, model.pt, model.onnx or TorchScript export (required)
#   INPUT          NIfTI files, folders and/or CSV/TSV tables, space-separated (required)
#   OUT            output CSV on a file system every node sees (required)
#   PREDICT_ARGS   extra `brainage predict` options, e.g. "--batch-size 8 --sex F"
#   WORKERS        preprocessing processes (CPUs of the task - 1, at least 1)
#   MAX_REQUEUES   stop requeueing after this many restarts (20)
#   VENV           python environment with brainage-hpc (BRAINAGE_HOME/.venv)
#SBATCH --job-name=brainage-predict
#SBATCH --array=0-3                # K tasks: 0..K-1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4          # preprocessing workers + the inference process
#SBATCH --time=60                  # minutes; the task requeues itself when they run out
#SBATCH --signal=B:USR1@120        # USR1 to this batch shell 120 s before the end
#SBATCH --requeue                  # allow requeue after preemption / time limit
#SBATCH --open-mode=append         # a requeued task appends to the same log
#SBATCH --output=slurm-%x-%A_%a.out
##SBATCH --gpus-per-task=1         # uncomment on GPU nodes
##SBATCH --partition=gpu
set -uo pipefail

: "${CHECKPOINT:?set CHECKPOINT to the run folder or exported model}"
: "${INPUT:?set INPUT to the scans (files, folders, tables)}"
: "${OUT:?set OUT to the output CSV}"
REPO="${BRAINAGE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
VENV="${VENV:-$REPO/.venv}"
PREDICT_ARGS="${PREDICT_ARGS:-}"
MAX_REQUEUES="${MAX_REQUEUES:-20}"
CPUS="${SLURM_CPUS_PER_TASK:-2}"
WORKERS="${WORKERS:-$(( CPUS > 1 ? CPUS - 1 : 1 ))}"
TASKS="$(( ${SLURM_ARRAY_TASK_MAX:-0} + 1 ))"
TASK_ID="${SLURM_ARRAY_TASK_ID:-0}"
export OMP_NUM_THREADS=1

echo "[$(date +%T)] job ${SLURM_JOB_ID:-?} task $TASK_ID of $TASKS restart ${SLURM_RESTART_COUNT:-0} on $(hostname): out=$OUT"

stop_signal=""
forward_signal() {
    stop_signal="$1"
    echo "[$(date +%T)] batch shell got $1: asking the task to stop between scans"
    kill -"$1" "$PID" 2>/dev/null
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM

# shellcheck disable=SC2086  # INPUT and PREDICT_ARGS are lists on purpose
srun --kill-on-bad-exit=0 "$VENV/bin/python" -u -m brainage_hpc.cli predict \
    --checkpoint "$CHECKPOINT" --input $INPUT --out "$OUT" \
    --tasks "$TASKS" --task-id "$TASK_ID" --workers "$WORKERS" $PREDICT_ARGS &
PID=$!
rc=0
while kill -0 "$PID" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
    wait "$PID"
    rc=$?
done

if [ "$rc" -eq 3 ] || { [ "$stop_signal" = USR1 ] && [ "$rc" -ne 0 ]; }; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
        echo "[$(date +%T)] stopped, but already requeued $MAX_REQUEUES times: not requeueing (is --time shorter than the signal lead?)"
        exit 1
    fi
    echo "[$(date +%T)] stopped between scans (exit $rc): requeueing ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "[$(date +%T)] task $TASK_ID finished with exit code $rc"
exit "$rc"
