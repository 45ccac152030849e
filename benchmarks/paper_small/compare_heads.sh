#!/usr/bin/env bash
# Which differences between heads (and between the MAE and the supervised encoder) hold on CIFAR-10's 10,000
# test images: paired bootstrap intervals and exact McNemar tests from the probes' kept per-row predictions.
# Smaller than measure.sh's probe table (10,000 seeded train images per model instead of 50,000, a 2-point grid
# for the token heads), so it runs on 2 CPU cores in minutes. Stores are reused when they exist (WORK).
#
#   DATA=/work/cifar/cifar10 bash benchmarks/paper_small/compare_heads.sh
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT="$HERE/results/compare"
mkdir -p "$OUT" "$WORK"
rm -rf "$OUT/results.jsonl" "$OUT/results.jsonl.preds"
for m in mae sup; do
  # shellcheck disable=SC2086
  [ -d "$WORK/${m}_train10k.zarr" ] || "$MIMPROBE" extract "$MODEL" "$DATA/train" "$WORK/${m}_train10k.zarr" \
    ${WEIGHTS[$m]} "${COMMON[@]}" --limit 10000 --batch-size 256 --quiet
  # shellcheck disable=SC2086
  [ -d "$WORK/${m}_test.zarr" ] || "$MIMPROBE" extract "$MODEL" "$DATA/test" "$WORK/${m}_test.zarr" \
    ${WEIGHTS[$m]} "${COMMON[@]}" --batch-size 256 --quiet
  "$MIMPROBE" probe "$WORK/${m}_train10k.zarr" "$WORK/${m}_test.zarr" \
    --head linear-cls,linear-mean,abmilp,attentive --lr 1e-3,3e-3 --wd 5e-2 \
    --out "$OUT/results.jsonl" --quiet | tee "$OUT/probe_$m.txt"
done
"$MIMPROBE" report "$OUT/results.jsonl" --out "$OUT/table.md"
"$MIMPROBE" report "$OUT/results.jsonl" --compare linear-cls --compare-plot "$OUT/vs_linear_cls.png" \
  | tee "$OUT/vs_linear_cls.md"
"$MIMPROBE" report "$OUT/results.jsonl" --compare model=mae | tee "$OUT/sup_vs_mae.md"
"$MIMPROBE" report "$OUT/results.jsonl" --compare abmilp | tee "$OUT/vs_abmilp.md"
"$MIMPROBE" report "$OUT/results.jsonl" --html "$OUT/report.html" --compare linear-cls > /dev/null
