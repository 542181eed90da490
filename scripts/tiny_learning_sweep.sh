#!/usr/bin/env bash
# Variants of scripts/tiny_learning.py side by side on a GPU host (each its own process; one JSON line per
# 100 steps in $OUT/<variant>.jsonl). Every variant stops after LIMIT seconds (default 240), so a lent
# machine's call returns with whatever each reached.
#
#   OUT=/tmp/out bash scripts/tiny_learning_sweep.sh
set -uo pipefail
OUT=${OUT:-/tmp/tiny-learning}
LIMIT=${LIMIT:-240}
STEPS=${STEPS:-3000}
mkdir -p "$OUT"
python3 -m jobs.tiny --out /tmp/tiny-base > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
run() {  # name, then tiny_learning.py arguments
  local name=$1; shift
  timeout "$LIMIT" python3 scripts/tiny_learning.py train --device cuda --steps "$STEPS" "$@" \
    > "$OUT/$name.jsonl" 2> "$OUT/$name.err" &
}
run colour            --model /tmp/tiny-base --task colour
run colour_224        --model /tmp/tiny-base --task colour --size 224
run colour_lr5e-3     --model /tmp/tiny-base --task colour --lr 5e-3
run colour_batch64    --model /tmp/tiny-base --task colour --batch 64
run colour_big        --build /tmp/tiny-big --hidden 256 --layers 4 --heads 8 --task colour
run colour_theta1e4   --build /tmp/tiny-theta --rope_theta 10000 --task colour --size 224
run point_gradient    --model /tmp/tiny-base --task point --background gradient
run point_224_big     --build /tmp/tiny-big2 --hidden 256 --layers 4 --heads 8 --task point --size 224
wait
for f in "$OUT"/*.jsonl; do echo "== $f"; tail -n 3 "$f" | cut -c1-160; done
