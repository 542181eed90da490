#!/usr/bin/env bash
# Variants of scripts/tiny_learning.py side by side on a GPU host (each its own process; one JSON line per
# 100 steps in $OUT/<variant>.jsonl). Every variant stops after LIMIT seconds (default 240), so a lent
# machine's call returns with whatever each reached.
#
#   OUT=/tmp/out bash scripts/tiny_learning_sweep.sh            # SET=area, SET=through, SET=chains: later sweeps
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
if [[ ${SET:-first} == first ]]; then  # the first sweep: batch, width, learning rate, image size
  run colour            --model /tmp/tiny-base --task colour
  run colour_224        --model /tmp/tiny-base --task colour --size 224
  run colour_lr5e-3     --model /tmp/tiny-base --task colour --lr 5e-3
  run colour_batch64    --model /tmp/tiny-base --task colour --batch 64
  run colour_big        --build /tmp/tiny-big --hidden 256 --layers 4 --heads 8 --task colour
  run colour_theta1e4   --build /tmp/tiny-theta --rope_theta 10000 --task colour --size 224
  run point_gradient    --model /tmp/tiny-base --task point --background gradient
  run point_224_big     --build /tmp/tiny-big2 --hidden 256 --layers 4 --heads 8 --task point --size 224
else
  python3 scripts/tiny_learning.py train --build /tmp/tiny-theta --rope_theta 10000 --steps 0 > /dev/null 2>&1
  python3 scripts/tiny_learning.py train --build /tmp/tiny-theta-big --rope_theta 10000 --hidden 256 --layers 4 \
    --heads 8 --steps 0 > /dev/null 2>&1
fi
if [[ ${SET:-first} == area ]]; then  # the target's size in vision tokens, with rope_theta 1e4
  run point_112_side4_t      --model /tmp/tiny-theta --task point --side 4,3
  run colour_112_side3_t    --model /tmp/tiny-theta --task colour --side 3,2
  run point_112_side3_t     --model /tmp/tiny-theta --task point --side 3,2
  run point_112_side3_t_big --model /tmp/tiny-theta-big --task point --side 3,2
  run point_112_side3_t_grad --model /tmp/tiny-theta --task point --side 3,2 --background gradient
  run point_224_side4_t     --model /tmp/tiny-theta --task point --size 224 --side 4,3
  run point_224_side4_t_grad --model /tmp/tiny-theta --task point --size 224 --side 4,3 --background gradient
  run point_224_side4_t_big --model /tmp/tiny-theta-big --task point --size 224 --side 4,3
elif [[ ${SET:-first} == chains ]]; then  # what the quickstart's SFT data changes: its chains, its image count
  for chain in named answer_only noisy; do
    run "${chain}_fresh"   --model /tmp/tiny-base --task colour --side 3,2 --system full --batch 8 --chain "$chain"
    run "${chain}_pool310" --model /tmp/tiny-base --task colour --side 3,2 --system full --batch 8 --chain "$chain" \
      --pool 310
  done
elif [[ ${SET:-first} == through ]]; then  # position written into the pixels, under the squares too
  run point_112_s32_grad         --model /tmp/tiny-theta --task point --side 3,2 --background gradient
  run point_112_s32_through      --model /tmp/tiny-theta --task point --side 3,2 --background through
  run point_112_s32_through_base --model /tmp/tiny-base  --task point --side 3,2 --background through
  run point_112_s43_through      --model /tmp/tiny-theta --task point --side 4,3 --background through
  run point_112_s43_through_b64  --model /tmp/tiny-theta --task point --side 4,3 --background through --batch 64
  run point_112_s43_through_lr1e-3 --model /tmp/tiny-theta --task point --side 4,3 --background through --lr 1e-3
  run point_112_s43_through_big  --model /tmp/tiny-theta-big --task point --side 4,3 --background through
  run point_224_s43_through      --model /tmp/tiny-theta --task point --size 224 --side 4,3 --background through
fi
wait
for f in "$OUT"/*.jsonl; do echo "== $f"; tail -n 3 "$f" | cut -c1-160; done
