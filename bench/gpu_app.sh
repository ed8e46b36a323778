#!/usr/bin/env bash
# The training application on one GPU, in one go (the figures of docs/benchmarks.md):
#   bash bench/gpu_app.sh OUT_DIR [STEPS] [PARTS...]
# PARTS (default: all): tests fsdp2 deepspeed single cpcheck generate e2e e2e_long layers
#   tests     GPU-marked tests
#   fsdp2     Evo 2 1B config, STEPS bf16 steps, FSDP2 (sh2 ContextParallelStrategy, CP = 1)
#   deepspeed the same with DeepSpeed ZeRO-2;  single: the same with Lightning's single-device strategy
#   cpcheck   the CP operators' code paths on CUDA in a 1-rank NCCL group (bench/cp_check.py)
#   generate  1,000 tokens from a random 7B-shape model after a 100K-token prompt (bench/generate.py)
#   e2e       training step of an 8-layer 7B-width SH2 stack vs the Transformer layout at 8K (bench/e2e.py)
#   e2e_long  the same at 32K and 128K with activation checkpointing
#   layers    one SE, MR, LI and MHA block each at the 7B width, fwd and fwd+bwd (bench/layers.py)
# Wheels of packages missing on the GPU image are carried in .whl_train/ (bash bench/fetch_wheels.sh builds it).
set -uo pipefail
OUT=${1:-/tmp/sh2_gpu}; STEPS=${2:-40}; shift $(( $# > 2 ? 2 : $# ))
PARTS=${*:-tests fsdp2 deepspeed single cpcheck generate e2e e2e_long layers}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if [ -d .whl_train ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_train/*.whl
fi
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
date -u
step() {  # step NAME SECONDS CMD...: run with a time limit, keep the whole log, show the lines that matter
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -aE "^\[sh2\]|Error|error:|passed|failed|FAIL|max rel|^ *[0-9]+ +(sh2|transformer)|prefill|decode|peak|\"" \
    "$OUT/$name.log" | grep -v Warning | tail -30
  echo "--- $name rc=$rc in $((SECONDS - t0)) s"
}
FIT=(python3 -m sh2 fit --config configs/evo2_1b_8k.yaml --trainer.max_steps "$STEPS"
     --trainer.val_check_interval "$STEPS" --trainer.limit_val_batches 2 --data.val_fraction 0.1
     --data.val_batches 2 --data.num_workers 1 --checkpoint.save_last false --checkpoint.save_top_k 0
     --trainer.logger.init_args.save_dir /tmp/runs)
for part in $PARTS; do
  case $part in
    tests) step gpu_tests 200 python3 -m pytest -q -m gpu tests -x -p no:cacheprovider ;;
    fsdp2) step fit_1b_fsdp2 150 "${FIT[@]}" ;;
    deepspeed) step fit_1b_deepspeed2 150 "${FIT[@]}" --trainer.strategy sh2_deepspeed_stage_2 ;;
    single) step fit_1b_single 150 "${FIT[@]}" --trainer.strategy auto ;;
    cpcheck) step cp_check 150 python3 bench/cp_check.py --no-deepspeed --out "$OUT/cp_check.json" ;;
    generate) step generate_7b 150 python3 bench/generate.py --preset evo2_7b_8k --prompt-len 100000 \
                --new-tokens 1000 --out "$OUT/generate_7b.json" ;;
    e2e) step e2e 200 python3 bench/e2e.py --preset evo2_7b_8k --layers 8 --lengths 8192 --steps 4 \
           --out "$OUT/e2e.json" ;;
    e2e_long) step e2e_long 240 python3 bench/e2e.py --preset evo2_7b_8k --layers 8 --lengths 32768 131072 \
           --steps 3 --checkpointing --out "$OUT/e2e_long.json" ;;
    layers) step layers 200 python3 bench/layers.py --out "$OUT/layers.json" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
