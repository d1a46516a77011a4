#!/bin/bash
# Train the conditional VAE (VAE-C) on a plain SLURM cluster.
#
#   sbatch slurm/train_vae.sh                                  # defaults below
#   sbatch --nodes=4 --gpus-per-node=4 --ntasks-per-node=4 slurm/train_vae.sh
#   CONFIG=cvae_demo OVERRIDES="data.shards=demo_out/shards" sbatch slurm/train_vae.sh
#
# Submit from the repository root (or set BRAINAGE_HOME): the job sources
# slurm/train_common.sh from there. Command-line sbatch options override the
# #SBATCH lines; environment variables (CONFIG, RUN_DIR, OVERRIDES, VENV)
# override the rest, so nothing in this file needs editing.
#SBATCH --job-name=brainage-vae
#SBATCH --nodes=1                  # machines
#SBATCH --ntasks-per-node=1        # one task (rank) per GPU; one per node on CPU
#SBATCH --cpus-per-task=2          # data-loader workers + main thread per rank
#SBATCH --time=60                  # minutes; the job requeues itself when it runs out
#SBATCH --signal=B:USR1@120        # USR1 to this batch shell 120 s before the end
#SBATCH --requeue                  # allow requeue after preemption / checkpoint
#SBATCH --open-mode=append         # requeued runs append to the same log
#SBATCH --output=slurm-%x-%j.out   # %x job name, %j job id
##SBATCH --gpus-per-node=4         # uncomment on GPU nodes (and set --ntasks-per-node=4)
##SBATCH --partition=gpu           # your cluster's partition

CONFIG="${CONFIG:-cvae_hcp}"
source "${BRAINAGE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/train_common.sh"
