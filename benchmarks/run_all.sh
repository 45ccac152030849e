#!/usr/bin/env bash
# Run every CPU benchmark in sequence with its default sizes; extra arguments go to every script
# (e.g. `benchmarks/run_all.sh --quick`, `benchmarks/run_all.sh --threads 2`).
# Each writes benchmarks/results/<name>.json and benchmarks/results/<name>.log; the headline ratios are
# summarised at the end. gpu_extract.py is not run here (it needs a GPU: run it on its own).
# PYTHON (default: the repository's .venv, else python3) chooses the interpreter.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
mkdir -p "$here/results"
benches=(extract_efficiency read_path cold_read probe_io decode cheap_experiments sweep_amortization storage linear_vs_sklearn knn checksum_cost token_loader)
declare -A ratio
failed=0
for b in "${benches[@]}"; do
    echo "=== $b $*" >&2
    start=$(date +%s)
    if "$py" "$here/$b.py" "$@" >"$here/results/$b.log" 2>"$here/results/$b.err"; then
        ratio[$b]="$(tail -n 1 "$here/results/$b.log")"
    else
        ratio[$b]="FAILED (see results/$b.err)"
        failed=1
    fi
    echo "    ${ratio[$b]}  ($(( $(date +%s) - start )) s)" >&2
done
echo "benchmark            headline"
for b in "${benches[@]}"; do
    printf '%-20s %s\n' "$b" "${ratio[$b]}"
done
exit $failed
