#!/usr/bin/env bash
# Train blocks with every local GPU (or N CPU processes): each rank takes a disjoint share
# of the blocks from the shared dump and writes into the shared param dir.
#   NPROC=8 bash scripts/train_torchrun.sh --model M --data_dir D --output_dir P --scheme w8a8c8 --dev cuda
# Multi-node: run the same on every node with NNODES, NODE_RANK, MASTER_ADDR set.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)}
exec .venv/bin/torchrun --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29511}" main.py "$@"
