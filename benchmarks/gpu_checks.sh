#!/usr/bin/env bash
# The GPU measurements of issue 14 (docs/performance.md), in one script that prints every figure:
#
#   1. the machine;
#   2. SAM decode: SamPredictor one image at a time vs the batched Segmenter.decode (ViT-B, B 64/128);
#   3. the rollout: the naive per-episode loop vs Agent.rollout, same actions and masks checked
#      (ViT-B with random weights at B 64/128, and the tiny SAM);
#   4. the PPO update alone: as before issue 14 (host reads every minibatch) vs now, float32 and
#      model.ppo.precision bf16, with the host syncs of each counted (ViT-B-sized and tiny states);
#   5. a whole training iteration by phase (tiny SAM, B 64), float32 and bf16.
#
#   bash benchmarks/gpu_checks.sh                 # on the GPU (about 5 min on one H200)
#   bash benchmarks/gpu_checks.sh --device cpu    # dry run: every step at toy sizes, on the CPU
#
# Everything printed also goes to $OUT/gpu_checks.txt when OUT is set (the device runner's folder).
set -euo pipefail

DEVICE=cuda
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_checks.sh: unknown argument $1 (use --device cuda|cpu)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
REPORT="${OUT:-}"
if [[ -n "$REPORT" ]]; then mkdir -p "$REPORT"; REPORT="$REPORT/gpu_checks.txt"; : > "$REPORT"; fi

say() { if [[ -n "$REPORT" ]]; then tee -a "$REPORT"; else cat; fi; }
step() { echo; echo "== $* =="; } 
run() {  # the command, then its output (Lightning's and torch's chatter dropped)
  echo "\$ $*"
  "$@" 2>&1 | grep -v -E "USDT|litlogger|LeafSpec|gpuGetDeviceCount|UserWarning|warnings.warn|^ *warn\(" || true
}

if [[ "$DEVICE" == cpu ]]; then
  # dry run: the same steps at toy sizes, to check that the script works where no GPU is lent
  DECODE_B=(2); ROLL_B=(2 3); STEPS=2; REPEATS=1; UPDATE_B=2; UPDATE_EPOCHS=2; TRAIN_B=2; BATCHES=2; EXTRA=(--threads 1)
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_checks.sh: no CUDA device here (use --device cpu for a dry run)" >&2; exit 1; }
  DECODE_B=(64 128); ROLL_B=(64 128); STEPS=5; REPEATS=3; UPDATE_B=64; UPDATE_EPOCHS=20; TRAIN_B=64; BATCHES=4; EXTRA=()
fi

{
  step "1. machine"
  run "$PY" -c "import torch, platform; d = torch.device('$DEVICE'); print('device', d, torch.cuda.get_device_name(d) if d.type == 'cuda' else platform.processor() or platform.machine(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
  if [[ "$DEVICE" != cpu ]] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi

  step "2. SAM decode, masks/s: SamPredictor loop vs batched (ViT-B, random weights)"
  run "$PY" benchmarks/decode.py --device "$DEVICE" --models vit_b --batch-sizes "${DECODE_B[@]}" --clicks 5 \
      --repeats "$REPEATS" "${EXTRA[@]}"

  step "3. rollout vs the naive per-episode loop, env steps/s (same actions and masks checked)"
  run "$PY" benchmarks/rollout.py --device "$DEVICE" --models vit_b tiny --batch-sizes "${ROLL_B[@]}" --steps "$STEPS" \
      --repeats "$REPEATS" "${EXTRA[@]}"

  step "4. the PPO update alone: before (per-minibatch host reads) / after fp32 / after bf16, with host syncs"
  for segmenter in vit_b tiny; do
    run "$PY" benchmarks/train_step.py --update-profile --device "$DEVICE" --segmenter "$segmenter" \
        --batch-size "$UPDATE_B" --steps "$STEPS" --ppo-epochs "$UPDATE_EPOCHS" --repeats "$REPEATS" "${EXTRA[@]}"
  done

  step "5. a training iteration by phase (tiny SAM, saliency), float32 then bf16"
  for precision in fp32 bf16; do
    run "$PY" benchmarks/train_step.py --device "$DEVICE" --batch-size "$TRAIN_B" --steps "$STEPS" \
        --ppo-epochs "$UPDATE_EPOCHS" --batches "$BATCHES" --epochs-timed 1 --precision "$precision" "${EXTRA[@]}"
  done
  echo
  echo "gpu_checks.sh: done ($DEVICE)"
} | say
