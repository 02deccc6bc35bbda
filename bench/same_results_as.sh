#!/bin/bash
# Does the working tree compute what commit REV computed? A small chain (prepare-data, pretrain-sasrec,
# instruction-tune and train-e4srec on the tiny backbone, then recommend) runs under both, seeded alike;
# the metrics, the recommendation and every weight file are then compared, bit for bit.
#   bash bench/same_results_as.sh [REV (default HEAD)] [WORK (default /tmp/e4srec-same)]
set -euo pipefail
REV=${1:-HEAD}
WORK=${2:-/tmp/e4srec-same}
ROOT=$(git rev-parse --show-toplevel)
PY=$ROOT/.venv/bin/python
rm -rf "$WORK" && mkdir -p "$WORK/pkgs"
git -C "$ROOT" worktree add -f --detach "$WORK/tree" "$REV" >/dev/null
trap 'git -C "$ROOT" worktree remove --force "$WORK/tree"' EXIT
# The commit's packages ahead of the installed (editable) ones on the import path
ln -s "$WORK/tree/shared/e4srec" "$WORK/pkgs/e4srec"
ln -s "$WORK/tree/components" "$WORK/pkgs/e4srec_components"
ln -s "$WORK/tree/pipelines" "$WORK/pkgs/e4srec_pipelines"
head -600 "$ROOT/data/Beauty.txt" > "$WORK/slice.txt"
for side in then now; do
  out=$WORK/$side
  if [ $side = then ]; then export PYTHONPATH=$WORK/pkgs; else unset PYTHONPATH; fi
  run() { "$PY" -m e4srec.cli "$@" --device cpu --no-tracking >> "$WORK/$side.log" 2>&1; }
  "$PY" -m e4srec.cli prepare-data --input "$WORK/slice.txt" --output "$out/data" --no-tracking > "$WORK/$side.log" 2>&1
  run pretrain-sasrec --data "$out/data" --output "$out/sasrec" --epochs 3
  run instruction-tune --instructions "$ROOT/data/instructions.json" --backbone tiny --max-examples 32 --holdout 8 \
      --generations 1 --max-new-tokens 4 --output "$out/llm"
  # --llm: the older name of --backbone, which revisions before and after the rename both take
  run train-e4srec --data "$out/data" --sasrec "$out/sasrec" --llm "$out/llm" --output "$out/e4srec" \
      --max-examples 256 --batch-size 32 --eval-users 100 --dtype fp32
  "$PY" -m e4srec.cli recommend --model "$out/e4srec" --history 1 2 3 --k 5 > "$out/recommend.json" 2>> "$WORK/$side.log"
done
unset PYTHONPATH
"$PY" - "$WORK" "$REV" <<'PYEOF'
import json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

work, rev = Path(sys.argv[1]), sys.argv[2]
then, now = work / "then", work / "now"
timing = lambda d: {k: v for k, v in d.items() if "seconds" not in k and "per_second" not in k}
same = True
for rel in ("data/metrics.json", "sasrec/metrics.json", "llm/metrics.json", "e4srec/metrics.json", "recommend.json"):
    a, b = json.loads((then / rel).read_text()), json.loads((now / rel).read_text())
    equal = timing(a) == timing(b)
    same &= equal
    print(f"{rel:45s} {'identical (timings aside)' if equal else 'DIFFERENT'}")
for rel in ("sasrec/model.safetensors", "sasrec/item_embeddings.safetensors", "llm/adapter/adapter_model.safetensors",
            "e4srec/head_proj.safetensors", "e4srec/adapter/adapter_model.safetensors"):
    a, b = load_file(str(then / rel)), load_file(str(now / rel))
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same &= equal
    print(f"{rel:45s} {'bit-identical' if equal else 'DIFFERENT'}")
print(f"the working tree computes {'exactly what' if same else 'NOT what'} {rev} computed")
sys.exit(0 if same else 1)
PYEOF
