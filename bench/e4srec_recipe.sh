#!/usr/bin/env bash
# The E4SRec recipe search for a 135M backbone on CPU: every variant trains train-e4srec's own model
# and loop (bench/e4srec_quality.py) on the same seeded subset of training examples and is scored on
# the same seeded users, beside the SASRec tables scored on those users by the same evaluator.
# Variants are chosen on validation NDCG@10 (full ranking); test is reported.
#
#   bash bench/e4srec_recipe.sh DATA SASREC_BCE SASREC_CE OUT_DIR [VARIANT...]
#
# DATA: prepare-data output of data/Beauty.txt; SASREC_*: pretrain-sasrec outputs on it (bce, ce);
# OUT_DIR: one JSON and one log per variant. A variant whose JSON exists is skipped, so the script
# can be started again after a stop. With VARIANT names, only those run.
set -euo pipefail
mkdir -p "$4"
DATA=$(realpath "$1") BCE=$(realpath "$2") CE=$(realpath "$3") OUT=$(realpath "$4")
shift 4
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

# Shared by every variant (a variant's own flags come after, so they win): the subset, the evaluation
# users, the backbone and the machine settings.
COMMON=(--max-examples "${EXAMPLES:-20000}" --eval-users "${EVAL_USERS:-3000}" --eval-batch-size 64
        --dtype "${DTYPE:-auto}" --threads "${THREADS:-2}" --device cpu --seed 42)

ATTN_MLP=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
# name=flags, in the order a run with no VARIANT names takes them
VARIANT_LIST=(
  # the paper's recipe: batch 16, lr 3e-4, random head, LoRA on the MLP, the BCE table
  "paper=--sasrec $BCE --batch-size 16 --lr 3e-4 --head-init random"
  "b64-lr1e-3=--sasrec $BCE --batch-size 64 --lr 1e-3 --head-init random"
  "b64-lr1e-3-items=--sasrec $BCE --batch-size 64 --lr 1e-3 --head-init items"
  "b64-lr3e-3-items=--sasrec $BCE --batch-size 64 --lr 3e-3 --head-init items"
  "b64-lr1e-3-items-ce=--sasrec $CE --batch-size 64 --lr 1e-3 --head-init items"
  "b64-lr1e-3-ce=--sasrec $CE --batch-size 64 --lr 1e-3 --head-init random"
  "b64-lr1e-3-items-attn=--sasrec $BCE --batch-size 64 --lr 1e-3 --head-init items --target-modules $ATTN_MLP"
  "b64-lr1e-3-items-last5=--sasrec $BCE --batch-size 64 --lr 1e-3 --head-init items --max-targets-per-user 5"
  # the same levers on the CE table, the stronger SASRec E4SRec has to beat
  "b64-lr1e-3-items-ce-attn=--sasrec $CE --batch-size 64 --lr 1e-3 --head-init items --target-modules $ATTN_MLP"
  "b64-lr2e-3-items-ce-attn=--sasrec $CE --batch-size 64 --lr 2e-3 --head-init items --target-modules $ATTN_MLP"
  "b64-lr1e-3-items-ce-r64=--sasrec $CE --batch-size 64 --lr 1e-3 --head-init items --lora-r 64 --lora-alpha 64"
  "b64-lr1e-3-items-ce-attn-r64=--sasrec $CE --batch-size 64 --lr 1e-3 --head-init items --target-modules $ATTN_MLP --lora-r 64 --lora-alpha 64"
  "b64-lr1e-3-items-ce-last5=--sasrec $CE --batch-size 64 --lr 1e-3 --head-init items --max-targets-per-user 5"
  "b32-lr1e-3-items-ce-attn=--sasrec $CE --batch-size 32 --lr 1e-3 --head-init items --target-modules $ATTN_MLP"
  # speed lever, not a recipe one: the default on the CE table trained under CPU autocast (bf16 LoRA and head)
  "b64-lr1e-3-items-ce-autocast=--sasrec $CE --batch-size 64 --lr 1e-3 --head-init items --dtype bf16 --autocast"
)
declare -A VARIANTS=() && ORDER=()
for v in "${VARIANT_LIST[@]}"; do VARIANTS[${v%%=*}]=${v#*=}; ORDER+=("${v%%=*}"); done
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ORDER[@]}")
for name in "${names[@]}"; do
  [ -n "${VARIANTS[$name]:-}" ] || { echo "unknown variant $name (known: ${ORDER[*]})" >&2; exit 2; }
  [ -f "$OUT/$name.json" ] && { echo "skip $name (done)"; continue; }
  echo "== $name: ${VARIANTS[$name]}"
  # shellcheck disable=SC2086  # the variant's flags are meant to split
  $PY bench/e4srec_quality.py --data "$DATA" "${COMMON[@]}" ${VARIANTS[$name]} --json "$OUT/$name.json.tmp" \
    > "$OUT/$name.log" 2>&1
  mv "$OUT/$name.json.tmp" "$OUT/$name.json"
  $PY - "$OUT/$name.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
m, s = r["metrics"], r["sasrec_same_users"]
print(f"   valid NDCG@10 {m['valid/full/NDCG@10']:.4f}  test HR@10 {m['test/full/HR@10']:.4f} NDCG@10 "
      f"{m['test/full/NDCG@10']:.4f}  (SASRec same users: test HR@10 {s['test/full/HR@10']:.4f}); "
      f"{r['examples_per_second']} ex/s, {r['wall_seconds']} s")
EOF
done
