#!/usr/bin/env bash
# Slurm array: task k trains blocks [k*BLOCKS_PER_TASK, (k+1)*BLOCKS_PER_TASK) on one GPU.
#   BLOCKS_PER_TASK=4 sbatch --array=0-15 --gres=gpu:1 scripts/train_slurm_array.sh \
#       --model M --data_dir D --output_dir P --scheme w4a8c8
# Every task reads the shared dump and writes its blocks into the shared param dir;
# reruns skip finished blocks, so a failed task is simply resubmitted.
#SBATCH --job-name=blockptq-train
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PER=${BLOCKS_PER_TASK:-4}
START=$(( ${SLURM_ARRAY_TASK_ID:-0} * PER ))
exec .venv/bin/python main.py "$@" --dev cuda:0 --start_block_idx "$START" --end_block_idx $(( START + PER ))
