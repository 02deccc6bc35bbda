#!/usr/bin/env bash
# The whole-dataset comparison from a raw S3-Rec file: prepare-data, SASRec with the BCE and the CE
# loss (in parallel, one thread each), then E4SRec on every training example (bench/e4srec_full.py:
# checkpointed, resumable) beside both SASRec tables on the same split.
#
#   bash bench/e4srec_full_chain.sh data/Toys_and_Games.txt .cache/work/toys bench/results/<date>-cpu/e4srec_toys_full.json
#
# Every finished step is skipped when the script is started again (after a stop or a session's end);
# E4SRec continues from its last checkpoint (every 100 steps) in WORK/e4srec_<table>.checkpoints.
# TABLE=ce makes E4SRec read the CE SASRec's item table instead of the BCE one (the default).
set -euo pipefail
RAW=$1 WORK=$2 JSON=$3 TABLE=${TABLE:-bce}
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export PYTHONUNBUFFERED=1
mkdir -p "$WORK"
[ -f "$WORK/data/manifest.json" ] || "$BIN/e4srec" prepare-data --input "$RAW" --output "$WORK/data" --no-tracking
for loss in bce ce; do
  extra=(); [ "$loss" = ce ] && extra=(--patience 20)  # CE peaks within ~50 epochs
  [ -f "$WORK/sasrec_$loss/metrics.json" ] || "$BIN/e4srec" pretrain-sasrec --data "$WORK/data" \
    --output "$WORK/sasrec_$loss" --loss "$loss" "${extra[@]}" --threads 1 --device cpu --no-tracking --overwrite \
    > "$WORK/sasrec_$loss.log" 2>&1 &
done
wait
"$BIN/python" bench/e4srec_full.py --data "$WORK/data" --sasrec "$WORK/sasrec_$TABLE" \
  --sasrec-bce "$WORK/sasrec_bce" --sasrec-ce "$WORK/sasrec_ce" --output "$WORK/e4srec_$TABLE" \
  --json "$JSON" --threads "${THREADS:-2}" --device cpu --checkpoint-every 100 \
  --batch-size 64 --lr 1e-3 --head-init items --epochs 1 --resume
