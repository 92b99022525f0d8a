#!/usr/bin/env bash
# The consumer-side check of deployed checkpoints on SmolLM2-135M: for each scheme, learn params
# (small budget), deploy, and compare the perplexity of the fake-quant model, of the deployed folder
# through our loader (eval_ppl.py), and of the deployed folder through plain transformers +
# compressed-tensors (scripts/transformers_ppl.py). Reuses the calibration dump of run_default.sh.
# SCHEMES="w8a8c8 w4a8c8" ACT=dynamic EPOCHS=2 WINDOWS=16 pick the runs (WINDOWS: eval windows of 512
# tokens; a W4A8 dynamic comparison needs 64, see README); results land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
M=assets/smollm2-135m
OUT=${OUT:-outputs/deployed_check}
CALIB=${CALIB:-outputs/default/calib}
ACT=${ACT:-dynamic}
EPOCHS=${EPOCHS:-2}
WINDOWS=${WINDOWS:-16}
EVAL_ARGS=(--dataset assets/corpus/eval.txt --seq_len 512 --max_windows "$WINDOWS")
[[ -f $CALIB/manifest.json ]] || $PY extract_calib_data.py --model $M --dataset assets/corpus/train.txt \
    --n_samples 8 --seq_len 512 --output_dir "$CALIB"
ROWS=()
for SCHEME in ${SCHEMES:-w8a8c8 w4a8c8}; do
    Q_ARGS=(--scheme "$SCHEME" --act "$ACT")
    [[ $SCHEME == w4* ]] && Q_ARGS+=(--group_size 64)
    P=$OUT/params_${SCHEME}_${ACT}
    D=$OUT/${SCHEME}_${ACT}_deployed
    $PY main.py --model $M --data_dir "$CALIB" --output_dir "$P" "${Q_ARGS[@]}" --epochs "$EPOCHS" --lr 2e-2
    $PY eval_ppl.py --model $M "${EVAL_ARGS[@]}" --param_dir "$P" --output_json "$OUT/ppl_${SCHEME}_fake.json"
    $PY deploy.py --input_weight_path $M --output_weight_path "$D" --quant_type "$SCHEME" --param_dir "$P" --overwrite
    $PY eval_ppl.py --model "$D" "${EVAL_ARGS[@]}" --output_json "$OUT/ppl_${SCHEME}_deployed.json"
    $PY scripts/transformers_ppl.py --model "$D" "${EVAL_ARGS[@]}" --output_json "$OUT/ppl_${SCHEME}_transformers.json"
    ROWS+=("$SCHEME fake-quant=$OUT/ppl_${SCHEME}_fake.json" "$SCHEME deployed=$OUT/ppl_${SCHEME}_deployed.json"
           "$SCHEME transformers=$OUT/ppl_${SCHEME}_transformers.json")
done
$PY scripts/ppl_table.py "${ROWS[@]}"
du -sh $M "$OUT"/*_deployed
