#!/usr/bin/env bash
# Peer baselines for bench_quality on our calibration dump; one JSON per recipe.
# Usage: bash bench/baselines/run_peers.sh RECIPE [RECIPE ...]   (from the repo root)
set -euo pipefail
VENV=${VENV:-outputs/venv-baseline}
CALIB=${CALIB:-outputs/peers/calib/tokens.safetensors}
OUT=${OUT:-outputs/peers/results}
ITERS=${ITERS:-200}
mkdir -p "$OUT" outputs/peers/logs
for r in "$@"; do
  case "$r" in
    autoround_*) script=(bench/baselines/autoround_w4a8.py --iters "$ITERS") ;;
    *) script=(bench/baselines/llmcompressor_gptq.py) ;;
  esac
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 19 "$VENV/bin/python" "${script[@]}" --recipe "$r" \
    --model assets/smollm2-135m --tokens "$CALIB" --eval_text assets/corpus/eval.txt \
    --seq_len 512 --max_windows 32 --threads 1 --output_json "$OUT/$r.json" \
    > "outputs/peers/logs/$r.log" 2>&1 || echo "$r failed: see outputs/peers/logs/$r.log"
done
