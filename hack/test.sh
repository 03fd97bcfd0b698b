#!/usr/bin/env bash
# The test command: installs prerequisites, checks style, runs every test as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "tests need root (real loop devices and mounts): run with sudo" >&2
  exit 1
fi
bash hack/setup.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets -- --test-threads 4
