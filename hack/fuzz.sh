#!/usr/bin/env bash
# A longer property-test run over every parser of untrusted input
# (names, tokens, --datadir JSON, CR YAML). Usage: bash hack/fuzz.sh [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
PROPTEST_CASES="${1:-200000}" cargo test --release --test properties
