#!/usr/bin/env bash
# The whole-dataset comparison from a raw S3-Rec file: prepare-data, SASRec with the BCE and the CE
# loss (in parallel, one thread each), then E4SRec on every training example (bench/e4srec_full.py:
# checkpointed, resumable) beside both SASRec tables on the same split.
#
#   bash bench/e4srec_full_chain.sh data/Toys_and_Games.txt .cache/work/toys bench/results/<date>-cpu/e4srec_toys_full.json
#
# Every finished step is skipped when the script is started again (after a stop or a session's end);
# E4SRec continues from its last checkpoint (every 100 steps) in WORK/<NAME>.checkpoints.
# TABLE=ce makes E4SRec read the CE SASRec's item table instead of the BCE one (the default).
# LOSSES=ce trains only the CE SASRec (the BCE row is then left out; SASREC_THREADS=2 gives it both
# cores). E4SREC_ARGS adds train-e4srec flags (they override the ones below) and NAME names E4SRec's
# output folder, e.g. the recipe's combined levers:
#   TABLE=ce LOSSES=ce NAME=e4srec_ce_levers E4SREC_ARGS="--max-targets-per-user 5 --lora-r 64 --lora-alpha 64
#     --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" bash bench/e4srec_full_chain.sh ...
set -euo pipefail
RAW=$1 WORK=$2 JSON=$3 TABLE=${TABLE:-bce} LOSSES=${LOSSES:-bce ce}
NAME=${NAME:-e4srec_$TABLE}
[[ " $LOSSES " == *" $TABLE "* ]] || { echo "TABLE=$TABLE needs that SASRec: add $TABLE to LOSSES (now: $LOSSES)" >&2; exit 2; }
read -r -a EXTRA <<< "${E4SREC_ARGS:-}"
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export PYTHONUNBUFFERED=1
mkdir -p "$WORK"
[ -f "$WORK/data/manifest.json" ] || "$BIN/e4srec" prepare-data --input "$RAW" --output "$WORK/data" --no-tracking
for loss in $LOSSES; do
  extra=(); [ "$loss" = ce ] && extra=(--patience 20)  # CE peaks within ~50 epochs
  [ -f "$WORK/sasrec_$loss/metrics.json" ] || "$BIN/e4srec" pretrain-sasrec --data "$WORK/data" \
    --output "$WORK/sasrec_$loss" --loss "$loss" "${extra[@]}" --threads "${SASREC_THREADS:-1}" --device cpu --no-tracking --overwrite \
    > "$WORK/sasrec_$loss.log" 2>&1 &
done
wait
rows=()
for loss in $LOSSES; do rows+=(--sasrec-"$loss" "$WORK/sasrec_$loss"); done
"$BIN/python" bench/e4srec_full.py --data "$WORK/data" --sasrec "$WORK/sasrec_$TABLE" "${rows[@]}" \
  --output "$WORK/$NAME" --json "$JSON" --threads "${THREADS:-2}" --device cpu --checkpoint-every 100 \
  --batch-size 64 --lr 1e-3 --head-init items --epochs 1 --resume "${EXTRA[@]}"
