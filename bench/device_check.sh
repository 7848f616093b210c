#!/usr/bin/env bash
# The accelerator measurements issue 7 still lacks, as one prepared run sized
# for a 15-minute device lease (one command of at most 600 s).
#
# Here, where the package index is reachable, once per checkout:
#   bash bench/device_check.sh --fetch-wheels
# downloads into .whl/ (git-ignored) the pure-Python packages that flaxseg's
# models and training step import and the CUDA image lacks or has in other
# versions: flax 0.12.8, optax 0.2.8, ml_collections 1.1.0 (the versions the
# H200 run of session 18 used with that image's jax 0.11.2).
#
# On the device machine, in the repository root (the image's python3 has
# jax[cuda], torch and torchvision; carry .whl):
#   bash bench/device_check.sh
# installs the wheels into /tmp/site, then runs the steps below, the most
# wanted first, each under its own time limit and all within
# DEVICE_CHECK_BUDGET seconds (default 540), so that one slow step cannot
# take the next one's time and the whole run ends inside the call. A step
# that no longer fits is skipped, and says so. Logs and JSON go to $OUT (the
# device tool's folder) or bench_out/.
#
#   env     the device, jax/torch versions
#   bf16    DeepLab v3-R50 training and inference, 8x513, bf16 compute
#           against torch autocast (float32 rows: BENCHMARKS.md, session 18)
#   remat   device memory and compile time of the R101 training step at
#           8x513, without and with remat (saves 65% of temporaries on XLA:CPU)
#   scan    the same with scan_blocks (compile time: slower on XLA:CPU)
#   tests   the bf16-tracks-float32 and remat/scan equality tests (ResNet,
#           DeepLab v3, CRF-as-RNN), on the GPU
#   scan_step  R101 training step time with scan_blocks against torch
#
# `--tiny` runs the same steps at toy sizes on any machine (what the test
# suite checks); `--steps a,b` runs only those steps.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-bench_out}
BUDGET=${DEVICE_CHECK_BUDGET:-540}
TINY=0
STEPS="env,bf16,remat,scan,tests,scan_step"
WHEELS=(flax==0.12.8 optax==0.2.8 ml_collections==1.1.0)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --fetch-wheels)
      mkdir -p .whl
      exec "$PY" -m pip download --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp -d .whl "${WHEELS[@]}" ;;
    --tiny) TINY=1 ;;
    --steps) shift; STEPS="$1" ;;
    *) echo "device_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null && [[ $TINY == 0 ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ $TINY == 1 ]]; then
  R50=fcn_resnet50_tv; R101=fcn_resnet50_tv; TV_SHAPE=1x33
  CM_MODEL=deeplabv3_resnet18; CM_BATCH=1; CM_CROP=17; PEAK=256; REPEATS=1
else
  R50=deeplabv3_resnet50_tv; R101=deeplabv3_resnet101_tv; TV_SHAPE=8x513
  CM_MODEL=deeplabv3_resnet101_tv; CM_BATCH=8; CM_CROP=513; PEAK=8192
  REPEATS=5
fi

ran=()
skipped=()
# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout LIMIT_S` (cut
# to what is left of the budget), its output in $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  [[ ",$STEPS," == *",$name,"* ]] || return 0
  local left=$((BUDGET - SECONDS))
  if (( left < 30 )); then
    echo "== $name: skipped, ${left} s of the budget left"
    skipped+=("$name")
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (at most ${limit} s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc after $SECONDS s"
  ran+=("$name:$rc")
}

step env 60 bash -c "nvidia-smi -L 2>/dev/null; $PY -c '
import jax, flax, optax
print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__,
      \"optax\", optax.__version__)
try:
  import torch, torchvision
  print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__,
        \"cuda\", torch.cuda.is_available())
except ImportError as e:
  print(\"no torch:\", e)
'"
step bf16 200 "$PY" bench/vs_torchvision.py --models "$R50" \
  --train "$TV_SHAPE" --infer "$TV_SHAPE" --dtype bfloat16 \
  --repeats "$REPEATS" --flops --peak_size "$PEAK" --json "$OUT/bf16_r50.json"
step remat 150 "$PY" bench/compile_memory.py --models "$CM_MODEL" \
  --batch "$CM_BATCH" --crop "$CM_CROP" --remat both --rss \
  --json "$OUT/remat_r101.json"
step scan 90 "$PY" bench/compile_memory.py --models "$CM_MODEL" \
  --batch "$CM_BATCH" --crop "$CM_CROP" --scan_blocks on --rss \
  --json "$OUT/scan_r101.json"
if [[ $TINY == 0 ]]; then
  # Compiled as users compile (the suite's fast-compile flag is for XLA:CPU).
  FLAXSEG_TEST_FAST_COMPILE=0 step tests 120 "$PY" -m pytest -v \
    -p no:cacheprovider tests/train/test_step.py \
    tests/models/test_resnet.py tests/models/test_deeplab.py \
    tests/crf/test_rnn.py -k "bf16 or scan or remat"
fi
step scan_step 150 "$PY" bench/vs_torchvision.py --models "$R101" \
  --train "$TV_SHAPE" --infer= --scan_blocks --repeats "$REPEATS" \
  --json "$OUT/scan_step_r101.json"

echo "device_check: ran ${ran[*]:-nothing}; skipped ${skipped[*]:-nothing}; ${SECONDS} s"
for r in "${ran[@]}"; do
  [[ $r == *:0 ]] || exit 1
done
