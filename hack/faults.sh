#!/usr/bin/env bash
# Runs the kill -9 fault matrix with several seeds (default 1 2 3).
# Usage: bash hack/faults.sh [SEED...]   (HPC_FAULT_ROUNDS=N for more kills)
set -euo pipefail
cd "$(dirname "$0")/.."
for seed in "${@:-1 2 3}"; do
  for s in $seed; do
    echo "== fault matrix seed $s" >&2
    HPC_FAULT_SEED="$s" cargo test --release --test faults kill9_matrix -- --nocapture
  done
done
