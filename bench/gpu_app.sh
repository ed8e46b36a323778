#!/usr/bin/env bash
# The training application on one GPU, in one go (used for docs/benchmarks.md):
#   bash bench/gpu_app.sh OUT_DIR [steps]
# 1. GPU-marked tests; 2. the Evo 2 1B config for a few dozen bf16 steps with FSDP2 (sh2's strategy, CP = 1),
# DeepSpeed ZeRO-2 and a plain single-device run; 3. the CP code paths on CUDA (bench/cp_check.py).
# Wheels of packages missing on the GPU image may be carried in .whl_train/ (datasets, jsonargparse, deepspeed).
set -uo pipefail
OUT=${1:-/tmp/sh2_gpu}; STEPS=${2:-40}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-}
if [ -d .whl_train ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_train/*.whl
fi
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
date -u
step() {  # step NAME CMD...: run, keep the whole log, show the lines that matter
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -aE "^\[sh2\]|Error|error:|passed|failed|skipped|FAIL|OK |max_rel|loss" "$OUT/$name.log" | grep -v Warning | tail -25
  echo "--- $name rc=$rc in $((SECONDS - t0)) s"
}
FIT=(python3 -m sh2 fit --config configs/evo2_1b_8k.yaml --trainer.max_steps "$STEPS"
     --trainer.val_check_interval "$STEPS" --trainer.limit_val_batches 2 --data.val_batches 2 --data.num_workers 1
     --checkpoint.save_last false --checkpoint.save_top_k 0 --trainer.logger.init_args.save_dir /tmp/runs)
step gpu_tests python3 -m pytest -q -m gpu tests -x -p no:cacheprovider
step fit_1b_fsdp2 "${FIT[@]}"
step fit_1b_deepspeed2 "${FIT[@]}" --trainer.strategy deepspeed_stage_2
step fit_1b_single "${FIT[@]}" --trainer.strategy auto
step cp_check python3 bench/cp_check.py --out "$OUT/cp_check.json"
