#!/usr/bin/env bash
# Block volume benchmark (issue 3): sequential O_DIRECT 2 GiB write/read,
# bs 1 MiB, through a published block volume vs a plain file on the same
# filesystem, plus publish+unpublish p50/p99 over 200 cycles. Needs root.
# Knobs: BLOCK_BENCH_GIB, BLOCK_BENCH_ROUNDS, BLOCK_BENCH_CYCLES,
# BLOCK_BENCH_FS=xfs (pool on a loop-mounted XFS instead of /tmp).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" -ne 0 ]; then
  echo "the benchmark needs root (loop devices and mounts)" >&2
  exit 1
fi
bash hack/setup.sh
exec cargo bench --bench block_io
