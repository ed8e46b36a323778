#!/usr/bin/env bash
# Multi-node training with torchrun (run this script on every node).
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 ./configs/launch/torchrun.sh configs/evo2_7b_8k.yaml [extra sh2 args]
# Lightning reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
# trainer.num_nodes and trainer.devices must match the launch.
set -euo pipefail
CONFIG=${1:?usage: torchrun.sh CONFIG.yaml [sh2 fit args...]}; shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m sh2 fit --config "$CONFIG" --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE" "$@"
