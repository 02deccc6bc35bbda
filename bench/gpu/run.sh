#!/usr/bin/env bash
# The GPU measurements of issues 3 and 4, in two device-tool calls made back to back (the machine
# stays warm about 30 s between them), after bench/gpu/prepare.sh here:
#
#   run(command="bash bench/gpu/run.sh a", carry=[".cache/gpu/a"], timeout_s=120)
#   run(command="bash bench/gpu/run.sh b", carry=[".cache/gpu/b"], timeout_s=600)
#
# Call a keeps the GGUF's first half and the packages outside the repo (carried folders are replaced
# at every call). Call b assembles SmolLM2 and writes into $OUT, each step's log beside its JSON:
#   e4srec_throughput.json   ranking with and without the prefix cache (batch 1024), training at 256
#   e4srec_quality.json      full Beauty, batch 256, as many epochs (1-3) as the time left allows
#   backbone_memory_speed.json  SmolLM2 bf16 vs NF4: load, weights and peak memory, LoRA step speed
# A step that fails or runs out of time leaves its log and lets the next one run.
# Dry run on CPU: KEEP=/tmp/x DEVICE=cpu BACKBONE=tiny DATA=... SASREC=... OUT=/tmp/o bash bench/gpu/run.sh b
set -uo pipefail
cd "$(dirname "$0")/../.."
KEEP=${KEEP:-/tmp/e4srec-gpu}
OUT=${OUT:?set OUT}
mkdir -p "$KEEP"
part=${1:?usage: run.sh a|b}
if [ -d ".cache/gpu/$part" ]; then cp -r ".cache/gpu/$part/." "$KEEP/"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
[ "$part" = a ] && { ls -la "$KEEP"; exit 0; }

if [ -z "${BACKBONE:-}" ]; then
    cat "$KEEP"/smol.part.* > "$KEEP/smol.gguf"
    [ "$(md5sum "$KEEP/smol.gguf" | cut -d' ' -f1)" = "$(cat "$KEEP/smol.md5")" ] || { echo "GGUF checksum differs"; exit 1; }
    BACKBONE=gguf:$KEEP/smol.gguf
fi
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-$KEEP/data}
SASREC=${SASREC:-$KEEP/sasrec}
PY=${PY:-python3}
USERS=${USERS:-4096}
export PYTHONPATH=$PWD/shared:$PWD/bench:$KEEP/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 E4SREC_CACHE=$KEEP/cache TOKENIZERS_PARALLELISM=false
start=$SECONDS
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$(( $2 < 30 ? 30 : $2 )); shift 2
    echo "== $name (limit ${limit}s, at ${SECONDS}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name exit $? after $((SECONDS - start))s"
    tail -n 3 "$OUT/$name.log"
}

step e4srec_throughput 150 $PY bench/e4srec_throughput.py --data "$DATA" --backbone "$BACKBONE" --device "$DEVICE" \
    --users "$USERS" --rank-batch 1024 --train-batch 256 --train-steps 20 --json "$OUT/e4srec_throughput.json"
# Epochs: as many (1-3) as fit in what is left of the call's 600 s, after the memory bench's 60 s.
epochs=$($PY - "$OUT/e4srec_throughput.json" $((480 - SECONDS + start)) <<'PYEOF'
import json, sys
try:
    est = json.load(open(sys.argv[1]))["training"]["epoch_estimate_seconds"]
except (OSError, KeyError, ValueError):
    est = 150
print(max(1, min(3, int((int(sys.argv[2]) - 60) / (est * 1.15)))))
PYEOF
)
step e4srec_quality $((480 - SECONDS + start)) $PY bench/e4srec_quality.py --data "$DATA" --sasrec "$SASREC" \
    --backbone "$BACKBONE" --device "$DEVICE" --batch-size 256 --lr 1e-3 --epochs "$epochs" \
    --eval-batch-size 1024 --json "$OUT/e4srec_quality.json"
step backbone_memory_speed $((585 - SECONDS + start)) $PY bench/backbone_memory_speed.py --backbone "$BACKBONE" \
    --device "$DEVICE" --variants bf16 nf4 --batch 64 --seq 110 --json "$OUT/backbone_memory_speed.json"
ls -la "$OUT"
