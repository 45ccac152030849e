#!/usr/bin/env bash
# Train the two small models of the "Beyond [cls]" reproduction, one after the other, on ONE CPU thread:
#   1. MAE pretraining        -> benchmarks/paper_small/models/mae_vit_tiny_cifar10_64px.safetensors (+ .json)
#   2. supervised reference   -> benchmarks/paper_small/models/sup_vit_tiny_cifar10_64px.safetensors (+ .json)
# Logs: benchmarks/paper_small/logs/{mae,sup}.log. Resumable checkpoints (with optimizer state):
# benchmarks/_work/paper_small/<model>/last.pt (git-ignored).
#
# Epochs are sized from 1-thread throughput measured on the 2-core dev machine (MAE ~180 img/s, supervised
# ~63 img/s): 10 MAE epochs ~46 min, 2.7 supervised epochs ~36 min; --minutes is a hard cap on top.
#
# Environment: DATA (CIFAR-10 root, default /work/cifar/cifar10), PYTHON (default .venv/bin/python),
# RESUME=1 to continue both runs from their last checkpoints.
#
#   nohup benchmarks/paper_small/run_training.sh > benchmarks/paper_small/logs/run_training.out 2>&1 &
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"   # HERE, REPO (the working directory), DATA
set +e  # each training run reports its own failure; the other still runs

PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
LOGS="$HERE/logs"
MODELS="$HERE/models"
WORK="$REPO/benchmarks/_work/paper_small"
RESUME_FLAG=()
[[ "${RESUME:-0}" == 1 ]] && RESUME_FLAG=(--resume)

# one thread everywhere: the other core belongs to someone else
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMEXPR_NUM_THREADS=1
export PYTHONUNBUFFERED=1

mkdir -p "$LOGS" "$MODELS" "$WORK"
status=0

run() {  # run NAME SCRIPT ARGS...: one training, logged to $LOGS/NAME.log; a failure does not stop the next
    local name="$1" script="$2"
    shift 2
    echo "[$(date '+%F %T')] start $name: $script $*"
    if [[ ${#RESUME_FLAG[@]} -gt 0 ]]; then  # keep the log of the interrupted run
        "$PYTHON" "$HERE/$script" "$@" "${RESUME_FLAG[@]}" >> "$LOGS/$name.log" 2>&1
    else
        "$PYTHON" "$HERE/$script" "$@" > "$LOGS/$name.log" 2>&1
    fi
    local rc=$?
    echo "[$(date '+%F %T')] end $name: exit $rc"
    [[ $rc -eq 0 ]] || status=$rc
}

run mae pretrain_mae.py --data "$DATA" --threads 1 --minutes 55 --epochs 10 --batch-size 256 --blr 1e-3 \
    --out "$MODELS/mae_vit_tiny_cifar10_64px.safetensors" --work-dir "$WORK/mae_vit_tiny_cifar10_64px"

run sup train_supervised.py --data "$DATA" --threads 1 --minutes 40 --epochs 2.7 --batch-size 128 \
    --out "$MODELS/sup_vit_tiny_cifar10_64px.safetensors" --work-dir "$WORK/sup_vit_tiny_cifar10_64px"

exit $status
