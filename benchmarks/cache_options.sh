#!/usr/bin/env bash
# Issue "cache options at scale", measured on the built-in demo set with the demo's model (random-init
# vit_tiny at 128 px): int8 vs float16 store size and probe top-1, and cached augmented views (--views 4 and 1)
# vs the center crop only. Stores go to benchmarks/_work/cache_options (git-ignored); results to
# benchmarks/results/cache_options.{jsonl,md}.
#
#   bash benchmarks/cache_options.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
MIMPROBE="${MIMPROBE:-$REPO/.venv/bin/mimprobe}"
W="$REPO/benchmarks/_work/cache_options"
OUT="$HERE/results"
mkdir -p "$W" "$OUT"
X=(vit_tiny_patch16_224 --no-pretrained --img-size 128 --crop-pct 1.0 --quiet)
P=(--head linear-mean,abmilp,attentive --lr 1e-3,3e-3 --wd 5e-4 --epochs 10 --batch-size 128 --quiet)
rm -f "$OUT/cache_options.jsonl"

for dtype in float16 int8; do
  "$MIMPROBE" extract "${X[0]}" demo:train:2000 "$W/train_$dtype.zarr" "${X[@]:1}" --dtype "$dtype"
  "$MIMPROBE" extract "${X[0]}" demo:eval:500 "$W/eval_$dtype.zarr" "${X[@]:1}" --dtype "$dtype"
  "$MIMPROBE" probe "$W/train_$dtype.zarr" "$W/eval_$dtype.zarr" "${P[@]}" --out "$OUT/cache_options.jsonl"
done
for k in 1 4; do
  "$MIMPROBE" extract "${X[0]}" demo:train:2000 "$W/train_views$k.zarr" "${X[@]:1}" --views "$k"
  "$MIMPROBE" probe "$W/train_views$k.zarr" "$W/eval_float16.zarr" "${P[@]}" --out "$OUT/cache_options.jsonl"
done

fp16=$("$MIMPROBE" info "$W/train_float16.zarr" | sed -n 's/^size on disk *//p')
int8=$("$MIMPROBE" info "$W/train_int8.zarr" | sed -n 's/^size on disk *//p')
echo "train store size: float16 $fp16, int8 $int8"
"$MIMPROBE" report "$OUT/cache_options.jsonl" --out "$OUT/cache_options.md"
cat "$OUT/cache_options.md"
