#!/bin/bash
# Multi-node training under SLURM: one `accelerate launch` per node, each starting one process per GPU
# (README.md "Launching on several processes").
#
#   sbatch --nodes 2 scripts/slurm_train.sh configs/joint_image_label.yaml run.name=big train.steps=100000
#
# Resuming is resubmitting the same command (the run folder's latest complete checkpoint is loaded,
# whatever the number of nodes). The run folder (run.dir) must be on a filesystem every node sees.
#SBATCH --job-name=unidiff
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts the per-GPU processes
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch [--nodes N] scripts/slurm_train.sh CONFIG [key=value ...]" >&2
    exit 2
fi

GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / GPUS_PER_NODE ))

# srun starts this block once per node; SLURM_NODEID is that node's machine rank.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --multi_gpu \
    --num_machines $SLURM_NNODES \
    --num_processes $(( SLURM_NNODES * GPUS_PER_NODE )) \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_IP \
    --main_process_port $MAIN_PORT \
    --same_network \
    -m unidiff.cli train $(printf '%q ' "$@")"
