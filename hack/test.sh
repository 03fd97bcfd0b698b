#!/usr/bin/env bash
# The test command: installs prerequisites, checks style, validates the
# rendered manifests against the Kubernetes schemas, runs every test as
# root (real loop devices, mounts, mkfs.xfs and a real gRPC socket), builds
# the image and runs the node e2e against it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "tests need root (real loop devices and mounts): run with sudo" >&2
  exit 1
fi
bash hack/setup.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
bash hack/validate-render.sh
# Benchmarks build and do a short smoke run (the long runs need --bench).
cargo test --benches
# The fault matrix runs one seed here; hack/faults.sh runs more.
HPC_FAULT_SEED="${HPC_FAULT_SEED:-1}" cargo test --lib --bins --tests -- --test-threads 4
# The image (hack/image.sh), and the node e2e that runs the rendered
# DaemonSet's driver container from it with podman, driven as kubelet drives it.
bash hack/image.sh
cargo test --test node_e2e -- --ignored --test-threads 2
