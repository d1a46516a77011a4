#!/bin/bash
# Train the seed 3D CNN on a plain SLURM cluster.
#
#   sbatch slurm/train_cnn.sh                                  # defaults below
#   sbatch --nodes=4 --gpus-per-node=4 --ntasks-per-node=4 slurm/train_cnn.sh
#   CONFIG=cnn_demo OVERRIDES="data.shards=demo_out/shards" sbatch slurm/train_cnn.sh
#
# Submit from the repository root (or set BRAINAGE_HOME): the job sources
# slurm/train_common.sh from there. Command-line sbatch options override the
# #SBATCH lines; environment variables override the rest, so nothing in this
# file needs editing:
#   CONFIG     config name or YAML file (default cnn_hcp)
#   RUN_DIR    run folder (default checkpoints/<job name>-<config name>, e.g.
#              checkpoints/brainage-cnn-cnn_hcp; RUNS_ROOT replaces checkpoints/)
#   OVERRIDES  "key=value ..." for the config, e.g. "train.epochs=5 data.batch_size=16"
#   VENV       python environment (default .venv)
#   MAX_STALLED_REQUEUES  stop requeueing after this many restarts without a new checkpoint (3)
#   DIST_TIMEOUT_S        process-group timeout: a hung rank ends the job this long after (default: config)
#
# Continue a run (after scancel, a crash, a node failure, the time limit):
# submit the same command again. The run folder depends on the job name and
# config, not on the job id, so the new job resumes from the newest checkpoint.
# Start a fresh run instead with another --job-name or RUN_DIR.
#
# Time limit: SLURM sends USR1 120 s before the end (--signal); the job
# checkpoints and requeues itself. Keep --time well above that lead, or the
# job stops requeueing after MAX_STALLED_REQUEUES restarts without progress.
# scancel (SIGTERM) checkpoints and ends the job for good; only USR1 requeues.
#SBATCH --job-name=brainage-cnn
#SBATCH --nodes=1                  # machines
#SBATCH --ntasks-per-node=1        # one task (rank) per GPU; one per node on CPU
#SBATCH --cpus-per-task=2          # data-loader workers + main thread per rank
#SBATCH --time=60                  # minutes; the job requeues itself when it runs out
#SBATCH --signal=B:USR1@120        # USR1 to this batch shell 120 s before the end
#SBATCH --requeue                  # allow requeue after preemption / checkpoint
#SBATCH --open-mode=append         # requeued runs append to the same log
#SBATCH --output=slurm-%x-%j.out   # %x job name, %j job id
##SBATCH --gpus-per-node=4         # uncomment on GPU nodes (and set --ntasks-per-node=4)
##SBATCH --mem=64G                 # memory per node
##SBATCH --partition=gpu           # your cluster's partition
##SBATCH --account=myproject       # the allocation to charge
##SBATCH --qos=normal              # quality of service
##SBATCH --constraint=a100         # node features
##SBATCH --exclude=gpu[03-04]      # nodes to avoid
##SBATCH --mail-type=END,FAIL      # mail when the job ends or fails
##SBATCH --mail-user=you@example.org

CONFIG="${CONFIG:-cnn_hcp}"
source "${BRAINAGE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/train_common.sh"
