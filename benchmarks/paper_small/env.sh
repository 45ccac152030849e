# Sourced by measure.sh and compare_heads.sh: the repository, CIFAR-10, mimprobe, the stores and the encoders.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO"
DATA="${DATA:-/work/cifar/cifar10}"
MIMPROBE="${MIMPROBE:-$REPO/.venv/bin/mimprobe}"
WORK="${WORK:-$REPO/benchmarks/_work/paper_small/stores}"   # large stores (git-ignored)
MODEL=vit_tiny_patch16_224
COMMON=(--img-size 64 --crop-pct 1.0)   # the encoders were trained on whole 32->64 px images
declare -A WEIGHTS=(
  [mae]="--checkpoint $HERE/models/mae_vit_tiny_cifar10_64px.safetensors"
  [sup]="--checkpoint $HERE/models/sup_vit_tiny_cifar10_64px.safetensors"
  [random]="--no-pretrained"
)
