#!/usr/bin/env bash
# The measurements of the small-scale "Beyond [cls]" reproduction, through mimprobe's own commands only.
# Needs the two trained encoders in models/ (run_training.sh) and CIFAR-10 as JPEGs:
#   mkdir -p /work/cifar && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /work/cifar
# Writes results/ (JSON, plots, tables; committed) and large stores under benchmarks/_work/ (git-ignored).
#
#   DATA=/work/cifar/cifar10 bash benchmarks/paper_small/measure.sh
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT="$HERE/results"
mkdir -p "$OUT" "$WORK"

# 1. [cls] attention entropy per block (512 test images), and one comparison plot
for m in mae sup random; do
  # shellcheck disable=SC2086
  "$MIMPROBE" attention "$MODEL" "$DATA/test" ${WEIGHTS[$m]} "${COMMON[@]}" --limit 512 --out "$OUT/attention_$m" --quiet \
    | tee "$OUT/attention_$m.txt"
done
"$MIMPROBE" attention --compare "$OUT/attention_mae/attention.json" "$OUT/attention_sup/attention.json" \
  "$OUT/attention_random/attention.json" --plot "$OUT/attention_compare.png"

# 2. extract CIFAR-10 train and test once per model; 3. probe every head from the cache
rm -f "$OUT/probe_results.jsonl"
for m in mae sup random; do
  for split in train test; do
    # shellcheck disable=SC2086
    "$MIMPROBE" extract "$MODEL" "$DATA/$split" "$WORK/${m}_$split.zarr" ${WEIGHTS[$m]} "${COMMON[@]}" \
      --batch-size 256 --quiet
  done
  "$MIMPROBE" probe "$WORK/${m}_train.zarr" "$WORK/${m}_test.zarr" \
    --head linear-cls,linear-mean,abmilp,attentive --lr 3e-4,1e-3,3e-3 --wd 5e-4,5e-2 --epochs 10 \
    --batch-size 256 --out "$OUT/probe_results.jsonl" --quiet | tee "$OUT/probe_$m.txt"
done

# 4. one table
"$MIMPROBE" report "$OUT/probe_results.jsonl" --format md --out "$OUT/probe_table.md" --plot "$OUT/probe_table.png"
cat "$OUT/probe_table.md"
