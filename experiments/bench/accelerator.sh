#!/usr/bin/env bash
# The accelerator (GPU or TPU) measurements of experiments/bench/README.md as one prepared
# command; section 10 there says what each part runs and what it found:
#
#   experiments/bench/accelerator.sh OUT_DIR PART... [--data_path=NPZ] [--rounds=N]
#
# PART: step (throughput.py), epoch (epoch_throughput.py over the CIFAR-10 sample's 10000
# training images), steady (steady_state.py's grid over the full CIFAR-10 npz), all (step and
# epoch). --rounds: step's and epoch's alternating rounds (default 2). Each part writes
# OUT_DIR/PART.json and OUT_DIR/PART.log; a failing part does not stop the next, and the exit
# status is the number of parts that failed. jaxprune goes on PYTHONPATH (no install); step
# and epoch need PyTorch. On one H200 with --rounds=1, epoch took 158 s and step over 150 s.
set -uo pipefail

usage="usage: $0 OUT_DIR PART... [--data_path=NPZ] [--rounds=N]; PART is step, epoch, steady or all"
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
    step|epoch|steady) parts+=("$arg") ;;
    all) parts+=(step epoch) ;;
    *) echo "error: '$arg' is not a part (step, epoch, steady, all), --data_path=NPZ or --rounds=N." >&2
       exit 2 ;;
  esac
done
if [ ${#parts[@]} -eq 0 ]; then
  echo "error: no part given. $usage" >&2
  exit 2
fi
if [ ${#data_flag[@]} -eq 0 ] && [[ " ${parts[*]} " =~ " "(epoch|steady)" " ]]; then
  echo "error: epoch and steady need --data_path=NPZ, the .npz of the CIFAR-10 sample (steady: the full CIFAR-10)." >&2
  exit 2
fi

bench=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$(cd "$bench/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
mkdir -p "$out"

failed=0
for part in "${parts[@]}"; do
  case "$part" in
    step) cmd=("$bench/throughput.py" --models=vgg16,resnet56 --jax_variants=auto/jaxprune
               --precisions=float32,bfloat16 --rounds="$rounds") ;;
    epoch) cmd=("$bench/epoch_throughput.py" --rounds="$rounds" --images=10000
                "${data_flag[@]}") ;;
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
