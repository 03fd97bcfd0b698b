#!/usr/bin/env bash
# Clone benchmark (issue 4): CreateVolume from a 10 GiB-virtual / 1 GiB-data
# disk.img vs GNU cp -a of the same directory, on XFS (reflink) and ext4
# pools, caches dropped before each run. Needs root.
# Knobs: HPC_BENCH_ROUNDS (default 5), HPC_BENCH_FS (default xfs,ext4),
# HPC_BENCH_PRETOUCH_GIB (default 3/4 of available memory, at most 16).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" -ne 0 ]; then
  echo "the benchmark needs root (loop devices, mounts, drop_caches)" >&2
  exit 1
fi
bash hack/setup.sh
exec cargo bench --bench clone
