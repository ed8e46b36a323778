#!/usr/bin/env bash
# The single-GPU benchmarks of docs/benchmarks.md, part by part, inside one device call:
#   bash bench/gpu_app.sh OUT_DIR [STEPS] PART...
# PARTS (each with its time limit in seconds; a part starts only if 60 s of the call's DEADLINE_S remain and
# gets at most what is left; the Python benchmarks get that limit minus a margin as --time-budget, skip and
# record what would not fit, and always write their JSON and tables):
#   smoke     (2 x 90) every code path of ops.py and e2e.py at small shapes (D = 512; tiny model), to catch a
#                   failure before the long parts spend device time on it
#   tests     (200) GPU-marked tests
#   ops       (260) kernels: SE, MR, LI modal vs FFT, fla peers at 8K/32K/128K, one LI layer at 1M (bench/ops.py)
#   e2e       (300) training step, 8-layer 7B-width SH2 stack vs Transformer layout at 8K, eager and compiled,
#                   with and without activation checkpointing (bench/e2e.py)
#   e2e_long  (560) the same at 32K and 128K
#   fit1b     (2 x 280) `sh2 fit` of configs/evo2_1b_8k.yaml, STEPS steps (default 30), model.compile off and on
#   sweep1b   (280 each) the same with compile on (where supported) and data.batch_size in SWEEP_1B (default "2 4")
#   fitcp     (2 x 330) configs/evo2_7b_128k_cp.yaml at the 7B width, CP_LAYOUT layers (default SDH*), 128K tokens,
#                   CP = NGPU (the GPUs torch sees), CP_STEPS steps (default 8), compile off and on
#   sweepcp   (330 each) the same with compile on and data.batch_size in SWEEP_CP (default "2")
#   lora7b    (2 x 270) configs/finetune_lora_evo2_7b.yaml on random 7B weights (no hub here) and the built-in
#                   data, STEPS steps: the LoRA finetune, then the same run as a full finetune (lora and freeze off)
#   fsdp2 deepspeed single  (240) the 1B config with FSDP2 / DeepSpeed ZeRO-2 / Lightning's single device,
#                   STEPS steps, validation on 2 batches at the end
#   cpcheck   (150) the CP operators' code paths on CUDA in a 1-rank NCCL group (bench/cp_check.py)
#   generate  (150) 1,000 tokens from a random 7B-shape model after a 100K-token prompt (bench/generate.py)
#   layers    (200) one SE, MR, LI and MHA block each at the 7B width, fwd and fwd+bwd (bench/layers.py)
# Every `sh2 fit` run carries bench/fit_probe.py's callback (tokens/s, MFU against the bf16 peak measured in the
# same process, peak memory, measured the same way in every run; JSON OUT_DIR/fit_NAME.json), and the script
# ends with one table of all fit runs in OUT_DIR. Logs: OUT_DIR/NAME.log; the screen shows each part's tables.
# Environment: DEADLINE_S (seconds for the whole call, default 570), SWEEP_1B, SWEEP_CP, CP_LAYOUT, CP_STEPS,
# NGPU. Wheels of packages missing on the GPU image are carried in .whl_train/ (bash bench/fetch_wheels.sh).
# Calls that fit the 10-minute limit: "smoke tests ops" | "e2e fit1b" | "e2e_long" | "sweep1b" | "fitcp sweepcp".
set -uo pipefail
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
STEPS=30
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then STEPS=$1; shift; fi
PARTS=$*
[ -n "$PARTS" ] || usage
for part in $PARTS; do
  case $part in
    smoke|tests|ops|e2e|e2e_long|fit1b|lora7b|sweep1b|fitcp|sweepcp|fsdp2|deepspeed|single|cpcheck|generate|layers) ;;
    *) echo "unknown part '$part'"; usage ;;
  esac
done
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
T0=$SECONDS; DEADLINE_S=${DEADLINE_S:-570}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if [ -d .whl_train ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl > "$OUT/pip.log" 2>&1 || echo "pip install of .whl_train failed (see $OUT/pip.log)"
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
date -u
NGPU=${NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
# Settings that moved between versions of the tree: ask the tree which form it takes.
HAS_COMPILE=$(python3 -c "import inspect; from sh2.training.module import SH2LightningModule as M
print(int('compile' in inspect.signature(M.__init__).parameters))" 2>/dev/null || echo 0)
CP_SIZE_KEY=$(python3 -c "import inspect; from sh2.strategies import ContextParallelStrategy as S
print('cp.size' if 'cp' in inspect.signature(S.__init__).parameters else 'context_parallel_size')" 2>/dev/null \
  || echo context_parallel_size)
[ "$HAS_COMPILE" = 1 ] || echo "note: this tree has no model.compile setting: compile-on fit runs are skipped"

step() {  # step NAME LIMIT CMD...: run with the smaller of LIMIT and the time left; keep the log, show the tables
  local name=$1 limit=$2; shift 2
  local left=$((T0 + DEADLINE_S - SECONDS))
  if [ "$left" -lt 60 ]; then echo "=== $name: not run (${left}s of DEADLINE_S left)"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  # the tables from their first heading on, else the lines that tell what happened
  if grep -q '^## ' "$OUT/$name.log"; then
    sed -n '/^## /,$p' "$OUT/$name.log" | grep -av "Warning\|warn("
  else
    grep -aE "^\[sh2\]|^\[bench\]|Error|error:|passed|failed|FAIL|prefill|decode|^note" "$OUT/$name.log" \
      | grep -av "Warning\|warn(" | tail -15
  fi
  grep -aE "Traceback|Error:" "$OUT/$name.log" | tail -3
  echo "--- $name rc=$rc in $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
}
budget() { echo $(( $1 - 30 )); }  # seconds a Python benchmark may plan for within a part of limit $1
probe() {  # probe NAME SKIP: the FitProbe callback argument
  echo "--trainer.callbacks+={\"class_path\": \"bench.fit_probe.FitProbe\", \"init_args\": {\"out\": \"$OUT/fit_$1.json\", \"name\": \"$1\", \"skip_steps\": $2}}"
}
compile_arg() {  # compile_arg on|off: the model.compile argument, or nothing when the tree lacks it
  [ "$HAS_COMPILE" = 1 ] && echo "--model.compile=$([ "$1" = on ] && echo true || echo false)"
}
SKIP1B=$((STEPS / 3))
FIT1B=(python3 -m sh2 fit --config configs/evo2_1b_8k.yaml --trainer.max_steps "$STEPS" --data.num_workers 1
       --data.val_fraction 0 --trainer.limit_val_batches 0 --trainer.logger false --trainer.enable_progress_bar false
       --checkpoint.save_last false --checkpoint.save_top_k 0 --checkpoint.monitor null)
FIT1B_VAL=(python3 -m sh2 fit --config configs/evo2_1b_8k.yaml --trainer.max_steps "$STEPS"
           --trainer.val_check_interval "$STEPS" --trainer.limit_val_batches 2 --data.val_fraction 0.1
           --data.val_batches 2 --data.num_workers 1 --checkpoint.save_last false --checkpoint.save_top_k 0
           --trainer.logger.init_args.save_dir /tmp/runs)
CP_LAYOUT=${CP_LAYOUT:-SDH*}; CP_STEPS=${CP_STEPS:-8}; SKIPCP=$((CP_STEPS / 3))
CP_OVR='{"rope_scaling": 16.0, "max_seq_len": 131072, "layout": "'$CP_LAYOUT'", "num_layers": '$(
  python3 -c "from sh2.models.config import parse_layout; print(len(parse_layout('$CP_LAYOUT')))")'}'
LAUNCH=(python3); [ "$NGPU" -gt 1 ] && LAUNCH=(python3 -m torch.distributed.run --standalone --nproc_per_node "$NGPU")
FITCP=("${LAUNCH[@]}" -m sh2 fit --config configs/evo2_7b_128k_cp.yaml --model.overrides "$CP_OVR"
       --data.seq_len 131072 --trainer.devices "$NGPU" "--trainer.strategy.init_args.$CP_SIZE_KEY=$NGPU"
       --trainer.max_steps "$CP_STEPS" --model.warmup_steps 2 --data.num_workers 1 --data.val_fraction 0
       --trainer.limit_val_batches 0 --trainer.logger false --trainer.enable_progress_bar false
       --checkpoint.save_last false --checkpoint.save_top_k 0 --checkpoint.monitor null)
fit1b() {  # fit1b NAME on|off EXTRA...
  local name=$1 c=$2; shift 2
  if [ "$c" = on ] && [ "$HAS_COMPILE" != 1 ]; then echo "=== $name: skipped (no model.compile)"; return; fi
  step "$name" 280 "${FIT1B[@]}" $(compile_arg "$c") "$@" "$(probe "$name" "$SKIP1B")"
}
fitcp() {  # fitcp NAME on|off EXTRA...
  local name=$1 c=$2; shift 2
  if [ "$c" = on ] && [ "$HAS_COMPILE" != 1 ]; then echo "=== $name: skipped (no model.compile)"; return; fi
  step "$name" 330 "${FITCP[@]}" $(compile_arg "$c") "$@" "$(probe "$name" "$SKIPCP")"
}
LORA7B=(python3 -m sh2 fit --config configs/finetune_lora_evo2_7b.yaml --model.init_from null
        --model.allow_random_init true --data.path null --trainer.max_steps "$STEPS" --data.num_workers 1
        --data.val_fraction 0 --trainer.limit_val_batches 0 --trainer.logger false --trainer.enable_progress_bar false
        --checkpoint.save_last false --checkpoint.save_top_k 0 --checkpoint.monitor null)
SWEEP_COMPILE=$([ "$HAS_COMPILE" = 1 ] && echo on || echo off)

for part in $PARTS; do
  case $part in
    smoke) step ops_smoke 90 python3 bench/ops.py --dim 512 --lengths 4096,16384 --long-len 65536 --check-len 2048 \
             --time-budget 60 --out "$OUT/ops_smoke.json"
           step e2e_smoke 90 python3 bench/e2e.py --preset tiny --layers 4 --lengths 1024 --time-budget 60 \
             --out "$OUT/e2e_smoke.json" ;;
    tests) step gpu_tests 200 python3 -m pytest -q -m gpu tests -x -p no:cacheprovider ;;
    ops) step ops 260 python3 bench/ops.py --time-budget "$(budget 260)" --out "$OUT/ops.json" ;;
    e2e) step e2e 300 python3 bench/e2e.py --lengths 8192 --time-budget "$(budget 300)" --out "$OUT/e2e.json" ;;
    e2e_long) step e2e_long 560 python3 bench/e2e.py --lengths 32768 131072 --time-budget "$(budget 560)" \
                --out "$OUT/e2e_long.json" ;;
    fit1b) fit1b 1b_eager off; fit1b 1b_compiled on ;;
    sweep1b) for b in ${SWEEP_1B:-2 4}; do fit1b "1b_${SWEEP_COMPILE}_b$b" "$SWEEP_COMPILE" --data.batch_size "$b"; done ;;
    fitcp) fitcp "7b_cp${NGPU}_eager" off; fitcp "7b_cp${NGPU}_compiled" on ;;
    sweepcp) for b in ${SWEEP_CP:-2}; do
               fitcp "7b_cp${NGPU}_${SWEEP_COMPILE}_b$b" "$SWEEP_COMPILE" --data.batch_size "$b"; done ;;
    lora7b) step fit_7b_lora 270 "${LORA7B[@]}" "$(probe 7b_lora "$SKIP1B")"
            step fit_7b_full 270 "${LORA7B[@]}" --model.lora null --model.freeze null "$(probe 7b_full "$SKIP1B")" ;;
    fsdp2) step fit_1b_fsdp2 240 "${FIT1B_VAL[@]}" "$(probe 1b_fsdp2 "$SKIP1B")" ;;
    deepspeed) step fit_1b_deepspeed2 240 "${FIT1B_VAL[@]}" --trainer.strategy sh2_deepspeed_stage_2 \
                 "$(probe 1b_deepspeed2 "$SKIP1B")" ;;
    single) step fit_1b_single 240 "${FIT1B_VAL[@]}" --trainer.strategy auto "$(probe 1b_single "$SKIP1B")" ;;
    cpcheck) step cp_check 150 python3 bench/cp_check.py --no-deepspeed --out "$OUT/cp_check.json" ;;
    generate) step generate_7b 150 python3 bench/generate.py --preset evo2_7b_8k --prompt-len 100000 \
                --new-tokens 1000 --out "$OUT/generate_7b.json" ;;
    layers) step layers 200 python3 bench/layers.py --out "$OUT/layers.json" ;;
  esac
done
if ls "$OUT"/fit_*.json > /dev/null 2>&1; then python3 bench/fit_probe.py "$OUT"/fit_*.json; fi
echo "== done in $((SECONDS - T0)) s ($(date -u +%FT%TZ))"
