#!/usr/bin/env bash
# Context parallelism on one host with NGPU GPUs (2, 4 or 8; NCCL, NVLink multicast off), in one command:
#   bash bench/multi_gpu.sh OUT_DIR
# 1. correctness of every CP operator and of the 7B-width model vs one GPU (bench/cp_correctness.py) with
#    CP = 2, 4, 8 (each <= NGPU);
# 2. scaling of a 7B-shape SE-MR-LI-MHA stack (LAYOUT, default SDH*) at 128K/256K/512K tokens with CP = 1 (the
#    baseline), 2, 4, 8 (<= NGPU), default schemes and one scheme changed at a time (LI p2p_fft, SE/MR a2a,
#    attention ring) (bench/cp_scaling.py);
# 3. training with `sh2 fit --config configs/evo2_7b_128k_cp.yaml` at the 7B width with LAYOUT's layers only (the
#    32-layer model would not fit the time box): FSDP2 CP = NGPU for FIT_STEPS steps and a checkpoint, resumed with
#    CP = NGPU/2 on NGPU/2 GPUs for RESUME_STEPS steps, and DeepSpeed ZeRO-3 CP = NGPU for DS_STEPS steps.
# Logs: OUT_DIR/NAME.log; JSON: OUT_DIR/correctness_nN.json, scaling_nN.json, fit_NAME.json (tokens/s, MFU and
# memory of each training run, bench/fit_probe.py); training CSV: OUT_DIR/csv/; tables: OUT_DIR/summary.md. Checkpoints go to CKPT_DIR (default /tmp/sh2_multi_ckpt), not under OUT_DIR.
# BUDGET seconds are shared among the phases that run, by weight; each phase has a deadline (unused time rolls
# over to the next phases) and a `timeout`. The scripts skip (and record) what would not fit; after a crash
# (e.g. out of memory on one rank) it is relaunched with --resume, which records the failed check or
# configuration and goes on. All processes are started by torchrun (Lightning reads its environment; no Lightning
# subprocess launcher). The phases need about 740 s on 2 GPUs, 1080 s on 4 and 1420 s on 8 (correctness and
# scaling grow with the CP sizes), more than one 10-minute device call: split them with SKIP, e.g.
#   2 GPUs: SKIP="train deepspeed"  |  SKIP="corr scal"
#   4 or 8: SKIP="scal train deepspeed"  |  SKIP="corr train deepspeed"  |  SKIP="corr scal"
#   (8 GPUs: the scaling phase alone needs ~660 s; split it further with LENGTHS / VLENGTHS)
# then copy the OUT folders into one and run `python3 bench/cp_summary.py DIR` for the tables of all.
# Options (environment): NGPU (default: the GPUs torch sees; DEVICE=cpu: 4), BUDGET (default: what the phases
# need), SKIP="corr scal train deepspeed", LAYOUT, FIT_STEPS, RESUME_STEPS, DS_STEPS, LENGTHS and VLENGTHS (scaling lengths, and the lengths of
# the scheme variants; space-separated), SH2_AUTOTUNE (default 0: Triton autotuning compiles every candidate, too
# slow for the time box), PY.
# Wheels of packages missing on the GPU image are carried in .whl_train/ (bash bench/fetch_wheels.sh builds it).
# DEVICE=cpu runs the same logic with gloo processes and tiny shapes (a smoke test of this script; no DeepSpeed).
set -uo pipefail
OUT=${1:?usage: bash bench/multi_gpu.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
# NVLink multicast stays off (KINDS.md), also for every child process.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# Triton kernel autotuning compiles and times every candidate config for every new shape (tens of seconds per
# process on a cold cache): off by default to fit the time box; SH2_AUTOTUNE=1 bash bench/multi_gpu.sh to time it.
export SH2_AUTOTUNE=${SH2_AUTOTUNE:-0}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-}                # seconds for all phases that run; default: the sum of their weights (below)
SKIP=${SKIP:-}                   # phases not to run, e.g. SKIP="corr train" (words: corr scal train deepspeed)
for w in $SKIP; do
  case $w in corr|scal|train|deepspeed) ;; *) echo "SKIP: unknown word '$w' (corr scal train deepspeed)"; exit 2;; esac
done
LAYOUT=${LAYOUT:-SDH*}           # layers of the scaling stack and of the training runs
FIT_STEPS=${FIT_STEPS:-20}; RESUME_STEPS=${RESUME_STEPS:-6}; DS_STEPS=${DS_STEPS:-4}
CKPT=${CKPT_DIR:-/tmp/sh2_multi_ckpt}
rm -rf "$CKPT" "$OUT"/csv "$OUT"/*.json "$OUT"/*.err
RUN=("$PY" -m torch.distributed.run --standalone)

if [ -d .whl_train ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_train/*.whl \
    > "$OUT/pip.log" 2>&1 || echo "pip install of .whl_train failed (see $OUT/pip.log)"
fi

if [ "$DEVICE" = cpu ]; then
  NGPU=${NGPU:-4}
  SHAPE=(--device cpu --width 32 --heads 4 --groups 4 --mlp 64 --mr-filter-len 8 --li-state 4)
  CORR=(--op-seq-len 64 --model-seq-len 64)
  LENGTHS=(256 512 1024); VLENGTHS=(256 512)
  SEQ=1024
  OVR='{"rope_scaling": 16.0, "max_seq_len": 131072, "num_layers": 4, "layout": "'$LAYOUT'", "hidden_size": 32,
        "num_heads": 4, "mlp_hidden_size": 64, "se_groups": 4, "mr_groups": 4, "mr_filter_len": 8}'
  FIT_DEV=(--trainer.accelerator cpu --trainer.precision 32-true --data.num_workers 0
           --trainer.strategy.init_args.process_group_backend gloo --trainer.strategy.init_args.mixed_precision null)
else
  NGPU=${NGPU:-$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null)}  # CUDA_VISIBLE_DEVICES
  SHAPE=(--device cuda)
  CORR=(--op-seq-len 8192 --model-seq-len 8192)
  read -ra LENGTHS <<< "${LENGTHS:-131072 262144 524288}"; read -ra VLENGTHS <<< "${VLENGTHS:-131072 262144}"
  SEQ=131072
  OVR='{"rope_scaling": 16.0, "max_seq_len": 131072, "layout": "'$LAYOUT'", "num_layers": '$(
    "$PY" -c "from sh2.models.config import parse_layout; print(len(parse_layout('$LAYOUT')))")'}'
  FIT_DEV=()
fi
case "$NGPU" in 2|4|8) ;; *) echo "NGPU=$NGPU: this script needs 2, 4 or 8 GPUs (processes)"; exit 2;; esac
CPS=(); for n in 2 4 8; do [ "$n" -le "$NGPU" ] && CPS+=("$n"); done

T0=$SECONDS
echo "== sh2 multi-GPU CP run: $(date -u +%FT%TZ), OUT=$OUT, DEVICE=$DEVICE, NGPU=$NGPU, LAYOUT=$LAYOUT"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi -L; nvidia-smi topo -m > "$OUT/topo.txt" 2>&1 && cat "$OUT/topo.txt"
fi
"$PY" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__,
'gpus', torch.cuda.device_count())" 2>&1 | tee "$OUT/versions.txt"
env | grep -E "^(NCCL_NVLS_ENABLE|TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS|SH2_AUTOTUNE)=" | tr '\n' ' '; echo

SHOW='FAIL|cp_correctness|cp_scaling|\[bench\]|^  cp[0-9]|^  model|resume:|\[sh2\]|Restor|Error|error:|Traceback|out of memory|Killed|skipped'
skipped() { case " $SKIP " in *" $1 "*) return 0;; esac; return 1; }
# The phases that run, in order, with their weights: the seconds each needs at the 7B shapes on H100s (measured on
# 2 GPUs, rounded up), scaled to BUDGET when it is given; END[name] = the phase's deadline after T0.
PLAN=()
if ! skipped corr; then for n in "${CPS[@]}"; do PLAN+=("corr$n:140"); done; fi
if ! skipped scal; then PLAN+=("scal1:60"); for n in "${CPS[@]}"; do PLAN+=("scal$n:200"); done; fi
if ! skipped train; then PLAN+=("fit:130" "resume:90"); fi
if ! skipped deepspeed; then
  if [ "$DEVICE" = cuda ]; then PLAN+=("deepspeed:120"); else echo "=== deepspeed: not run on $DEVICE (needs CUDA)"; fi
fi
declare -A END
total=0; for p in "${PLAN[@]}"; do total=$((total + ${p#*:})); done
BUDGET=${BUDGET:-$total}
if [ "$total" -gt 560 ] && [ "$BUDGET" -ge "$total" ]; then
  echo "note: these phases need ~${total}s; a device call allows 600 s: split them with SKIP (header)"
elif [ "$BUDGET" -lt "$total" ]; then
  echo "note: BUDGET=${BUDGET}s < the ~${total}s these phases need: each gets a share, checks left over are skipped"
fi
acc=0; for p in "${PLAN[@]}"; do acc=$((acc + ${p#*:})); END[${p%%:*}]=$((acc * BUDGET / (total > 0 ? total : 1))); done
echo "budget ${BUDGET}s; phases (deadline s after start): $(for p in "${PLAN[@]}"; do printf '%s@%s ' "${p%%:*}" "${END[${p%%:*}]}"; done)"

phase() {  # phase NAME END CMD...: run CMD until T0 + END seconds at the latest; keep its log, show key lines
  local name=$1 end=$2; shift 2
  local left=$((T0 + end - SECONDS))
  if [ "$left" -lt 15 ]; then echo "=== $name: not run (time box: ${left}s left)"; return 0; fi
  echo "=== $name (timeout ${left}s): $*"
  local t=$SECONDS
  timeout -k 40 "$left" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -aE "$SHOW" "$OUT/$name.log" | grep -avE "Warning|warn\(" | tail -40
  echo "--- $name rc=$rc in $((SECONDS - t)) s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
  return 0
}
correctness() {  # correctness NPROC: relaunched with --resume after a crash (the failing check is recorded)
  local n=$1 end=${END[corr$1]} attempt
  for attempt in 1 2 3; do
    local left=$((T0 + end - SECONDS))
    [ "$left" -lt 25 ] && break
    phase "correctness_n${n}_try$attempt" "$end" "${RUN[@]}" --nproc_per_node "$n" bench/cp_correctness.py \
      "${SHAPE[@]}" "${CORR[@]}" --layout "$LAYOUT" --time-budget $((left - 20)) --resume \
      --out "$OUT/correctness_n$n.json"
    grep -q "cp_correctness (cp=$n):" "$OUT/correctness_n${n}_try$attempt.log" && break
  done
}
scaling() {  # scaling NPROC STEPS: cp_scaling.py, relaunched with --resume after a crash (OOM, several ranks)
  local n=$1 steps=$2 end=${END[scal$1]} attempt
  for attempt in 1 2 3; do
    local left=$((T0 + end - SECONDS))
    [ "$left" -lt 25 ] && break
    phase "scaling_n${n}_try$attempt" "$end" "${RUN[@]}" --nproc_per_node "$n" bench/cp_scaling.py "${SHAPE[@]}" \
      --layout "$LAYOUT" --lengths "${LENGTHS[@]}" --variant-lengths "${VLENGTHS[@]}" --warmup 1 --steps "$steps" \
      --time-budget $((left - 20)) --resume --out "$OUT/scaling_n$n.json"
    grep -q "cp_scaling (cp=$n): done" "$OUT/scaling_n${n}_try$attempt.log" && break
  done
}

# 3. training with sh2 fit (7B width, LAYOUT's layers, 128K tokens; no validation: the built-in demo data has no
#    128K-token validation window): FSDP2 CP = NGPU -> checkpoint -> CP = NGPU/2, and DeepSpeed ZeRO-3 CP = NGPU
# The CP size setting: nested (cp.size) or flat (context_parallel_size), whichever this tree's strategies take.
CP_KEY=$("$PY" -c "import inspect; from sh2.strategies import ContextParallelStrategy as S
print('cp.size' if 'cp' in inspect.signature(S.__init__).parameters else 'context_parallel_size')")
DS_STRATEGY=$("$PY" -c "import inspect, json; from sh2.strategies.deepspeed import ContextParallelDeepSpeedStrategy as S
nested = 'cp' in inspect.signature(S.__init__).parameters
print(json.dumps({'class_path': 'sh2.strategies.deepspeed.ContextParallelDeepSpeedStrategy',
                  'init_args': {**({'cp': {'size': $NGPU}} if nested else {'context_parallel_size': $NGPU}), 'stage': 3}}))")
probe() {  # probe NAME SKIP: bench/fit_probe.py's callback, writing OUT/fit_NAME.json
  echo "--trainer.callbacks+={\"class_path\": \"bench.fit_probe.FitProbe\", \"init_args\": {\"out\": \"$OUT/fit_$1.json\", \"name\": \"$1\", \"skip_steps\": $2}}"
}
FIT=(-m sh2 fit --config configs/evo2_7b_128k_cp.yaml --model.overrides "$OVR" --data.seq_len "$SEQ"
     --model.warmup_steps 5 --model.decay_steps 1000 --model.log_every_n_steps 5 --trainer.log_every_n_steps 1
     --data.val_fraction 0 --trainer.limit_val_batches 0 --trainer.logger lightning.pytorch.loggers.CSVLogger
     --trainer.logger.init_args.save_dir "$OUT/csv" --checkpoint.monitor null --checkpoint.save_top_k 0
     "${FIT_DEV[@]}")
training() {  # FSDP2 CP = NGPU and a checkpoint; resume with CP = NGPU/2 on NGPU/2 GPUs
  local half=$((NGPU / 2))
  phase "fit_fsdp_cp$NGPU" "${END[fit]}" "${RUN[@]}" --nproc_per_node "$NGPU" "${FIT[@]}" --trainer.devices "$NGPU" \
    "--trainer.strategy.init_args.$CP_KEY=$NGPU" --trainer.max_steps "$FIT_STEPS" \
    --trainer.logger.init_args.name "fit_fsdp_cp$NGPU" --checkpoint.save_last true --checkpoint.dirpath "$CKPT" \
    --checkpoint.every_n_train_steps "$FIT_STEPS" "$(probe "fsdp_cp$NGPU" $((FIT_STEPS / 4)))"
  if [ ! -e "$CKPT/last.ckpt" ]; then echo "=== fit_fsdp_cp${half}_resume: not run (no checkpoint $CKPT/last.ckpt)"; return; fi
  echo "checkpoint: $(du -sh "$CKPT/last.ckpt" | cut -f1) in $CKPT/last.ckpt"
  phase "fit_fsdp_cp${half}_resume" "${END[resume]}" "${RUN[@]}" --nproc_per_node "$half" "${FIT[@]}" \
    --trainer.devices "$half" "--trainer.strategy.init_args.$CP_KEY=$half" \
    --trainer.max_steps $((FIT_STEPS + RESUME_STEPS)) --trainer.logger.init_args.name "fit_fsdp_cp${half}_resume" \
    --checkpoint.save_last false --ckpt_path "$CKPT/last.ckpt" \
    "$(probe "fsdp_cp${half}_resume" $((FIT_STEPS + RESUME_STEPS / 3)))"
}
deepspeed_run() {  # DeepSpeed ZeRO-3, CP = NGPU (CUDA only)
  phase "fit_deepspeed3_cp$NGPU" "${END[deepspeed]}" "${RUN[@]}" --nproc_per_node "$NGPU" "${FIT[@]}" \
    --trainer.devices "$NGPU" --trainer.strategy "$DS_STRATEGY" --trainer.max_steps "$DS_STEPS" \
    --trainer.logger.init_args.name "fit_deepspeed3_cp$NGPU" --checkpoint.save_last false \
    "$(probe "deepspeed3_cp$NGPU" 1)"
}

for p in "${PLAN[@]}"; do
  name=${p%%:*}
  case "$name" in
    corr*) correctness "${name#corr}" ;;
    scal1) scaling 1 1 ;;           # one timed step after the warm-up: CP = 1 steps take seconds
    scal*) scaling "${name#scal}" 2 ;;
    fit) training ;;                # also runs the resume phase
    deepspeed) deepspeed_run ;;
  esac
done
rm -rf "$CKPT"

# 4. tables
"$PY" bench/cp_summary.py "$OUT" > "$OUT/summary.log" 2>&1 && cat "$OUT/summary.md" || tail -20 "$OUT/summary.log"
echo "== done in $((SECONDS - T0)) s ($(date -u +%FT%TZ))"
