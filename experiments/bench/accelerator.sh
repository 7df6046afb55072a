#!/usr/bin/env bash
# The accelerator (GPU or TPU) targets of experiments/bench/README.md, as one prepared command.
#
#   experiments/bench/accelerator.sh OUT_DIR PART... [--data_path=NPZ] [--rounds=N]
#
# PART is one or more of
#   step    throughput.py: VGG-16 and ResNet-56 train steps, jaxprune in float32 and bfloat16
#           against PyTorch, batch 128 (section 2; on a GPU PyTorch runs there too).
#   epoch   epoch_throughput.py: whole epochs with data loading, train.fit against a PyTorch
#           DataLoader loop, over all 10000 training images of the sample (78 steps: the
#           CPU's 2048 are too few steps to time a GPU epoch) (section 8; the target: at
#           least 1.5x PyTorch's epoch throughput).
#   seeds   seeds.py: --seeds=5 in one process (loop and vmap) against five separate runs of
#           resnet20, 32 steps per stage, every seed pruned to the same widths (section 6;
#           the target: --seeds=5 at least 1.5x five sequential runs). The separate runs go once,
#           without a compilation cache (--nocached_runs: five fewer processes).
#   steady  steady_state.py: resnet20, resnet56 and vgg16 at batch 64 and 128, float32 and
#           bfloat16, steps one by one against 50-step calls, one copy against K = 2, 4, 8
#           vmapped copies, compilation timed apart (issue #19's table); over the full
#           CIFAR-10 npz that --data_path names.
#   all     step, epoch and seeds, in that order.
# --rounds sets step's and epoch's alternating rounds (default 2; 1 where a call's time is
# short). Each part writes OUT_DIR/PART.json (its table, the machine and the versions) and
# OUT_DIR/PART.log (everything it printed). Parts run one after another and a failing part
# does not stop the next; the exit status is the number of parts that failed.
#
# It needs the repository (run it from anywhere), jax with the accelerator's plugin, flax,
# optax, orbax-checkpoint, absl-py, etils, scipy and scikit-learn, and PyTorch for `step`
# and `epoch`; jaxprune itself is put on PYTHONPATH, so it needs no install. `epoch` and
# `seeds` read the CIFAR-10 sample npz, which --data_path names (required for them).
# On one H200 GPU with --rounds=1, epoch took 158 s, seeds about 5 minutes (seven launch.py
# processes of 38-57 s, mostly compilation) and step over 150 s: where a call is
# time-limited, run one part per call.
set -uo pipefail

usage="usage: $0 OUT_DIR PART... [--data_path=NPZ] [--rounds=N]; PART is step, epoch, seeds, steady or all"
out=${1:?$usage}
shift
data_flag=()
rounds=2
parts=()
for arg in "$@"; do
  case "$arg" in
    --data_path=*) data_flag=("$arg") ;;
    --rounds=*) rounds=${arg#--rounds=}
      if ! [[ "$rounds" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: --rounds='$rounds' is not a positive whole number." >&2
        exit 2
      fi ;;
    step|epoch|seeds|steady) parts+=("$arg") ;;
    all) parts+=(step epoch seeds) ;;
    *) echo "error: '$arg' is not a part (step, epoch, seeds, steady, all), --data_path=NPZ or --rounds=N." >&2
       exit 2 ;;
  esac
done
if [ ${#parts[@]} -eq 0 ]; then
  echo "error: no part given. $usage" >&2
  exit 2
fi
if [ ${#data_flag[@]} -eq 0 ] && [[ " ${parts[*]} " =~ " "(epoch|seeds|steady)" " ]]; then
  echo "error: epoch, seeds and steady need --data_path=NPZ, the .npz of the CIFAR-10 sample (steady: the full CIFAR-10)." >&2
  exit 2
fi

bench=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$bench/../.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
mkdir -p "$out"

failed=0
for part in "${parts[@]}"; do
  case "$part" in
    step) cmd=("$bench/throughput.py" --models=vgg16,resnet56 --jax_variants=auto/jaxprune
               --precisions=float32,bfloat16 --rounds="$rounds") ;;
    epoch) cmd=("$bench/epoch_throughput.py" --rounds="$rounds" --images=10000
                "${data_flag[@]}") ;;
    seeds) cmd=("$bench/seeds.py" --selection=layer --max_train=2048 --epochs=2
                --nocached_runs "${data_flag[@]}") ;;
    steady) cmd=("$bench/steady_state.py" --models=resnet20,resnet56,vgg16 --batches=64,128
                 --precisions=float32,bfloat16 --copies=1,2,4,8 --modes=calls,steps
                 --steps=50 --repeats=3 "${data_flag[@]}") ;;
  esac
  echo "== $part: $python ${cmd[*]} --out=$out/$part.json  ($(date -u +%H:%M:%S) UTC)"
  start=$SECONDS
  "$python" "${cmd[@]}" --out="$out/$part.json" 2>&1 | tee "$out/$part.log"
  status=${PIPESTATUS[0]}
  echo "== $part: exit status $status after $((SECONDS - start)) s"
  [ "$status" -eq 0 ] || failed=$((failed + 1))
done
exit "$failed"
