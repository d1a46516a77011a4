# Shared body of slurm/train_cnn.sh and slurm/train_vae.sh (sourced, not run).
#
# Inside the job: srun starts one task per rank; each task runs
# `brainage train ... --resume auto`, so a requeued job continues from its
# newest checkpoint. SLURM sends USR1 to this batch shell 120 s before the time
# limit or on preemption (--signal=B:USR1@120); we forward it to every task,
# the trainer checkpoints at the next step boundary and exits with code 3,
# and we requeue the job.
set -uo pipefail

REPO="${BRAINAGE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"   # repo checkout, shared by all nodes
VENV="${VENV:-$REPO/.venv}"                         # python env with brainage-hpc installed
RUN_DIR="${RUN_DIR:-$REPO/checkpoints/${SLURM_JOB_NAME:-brainage}-${SLURM_JOB_ID:-local}}"  # same after requeue
OVERRIDES="${OVERRIDES:-}"                           # e.g. "train.epochs=5 data.batch_size=16"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.torch_extensions}"  # DeepSpeed's compiled CPU ops, cached
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"   # one BLAS thread per CPU we own

# Rendezvous: the first node of the allocation hosts the process-group master.
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
getent hosts "$MASTER_ADDR" >/dev/null 2>&1 || MASTER_ADDR=127.0.0.1  # test clusters name nodes n1..n4
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

echo "[$(date +%T)] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: config=$CONFIG run_dir=$RUN_DIR"

preempted=0
forward_signal() {
    preempted=1
    echo "[$(date +%T)] batch shell got USR1: asking the tasks to checkpoint"
    kill -USR1 "$SRUN_PID" 2>/dev/null   # srun forwards USR1 to every task
}
trap forward_signal USR1 TERM

# --kill-on-bad-exit=0: one rank leaving first must not kill the others mid-checkpoint.
srun --kill-on-bad-exit=0 "$VENV/bin/python" -u -m brainage_hpc.cli train \
    --config "$CONFIG" --run-dir "$RUN_DIR" --resume auto $OVERRIDES &
SRUN_PID=$!
rc=0
# `wait` returns early when a trapped signal arrives: keep waiting for srun.
while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID"
    rc=$?
done

if [ "$rc" -eq 3 ] || { [ "$preempted" -eq 1 ] && [ "$rc" -ne 0 ]; }; then
    echo "[$(date +%T)] checkpoint written (exit $rc): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "[$(date +%T)] training finished with exit code $rc"
exit "$rc"
