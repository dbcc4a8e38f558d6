#!/usr/bin/env bash
# Link the offline sample assets (DeiT-Tiny weights, ImageNet samples) into data/ when a shared
# folder sits beside the checkout. Elsewhere, point paths.data_dir at your own copies (README).
set -euo pipefail
shared="${1:-../shared/data}"
cd "$(dirname "$0")/.."
[ -d "$shared" ] || { echo "no $shared beside the checkout: set paths.data_dir yourself (README)"; exit 0; }
shared="$(cd "$shared" && pwd)"
for asset in deit_tiny_pipevit imagenet_val_subset_acuity1300 imagenet_sample_1000 imagenet_labels cifar10_test_jpeg; do
    if [ -e "$shared/$asset" ] && [ ! -e "data/$asset" ]; then
        ln -s "$shared/$asset" "data/$asset"
    fi
done
