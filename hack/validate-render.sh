#!/usr/bin/env bash
# Renders every example CR and checks each document against the Kubernetes
# schemas (PyPI kubernetes-validate, newest release it knows, strict), plus
# the checked-in goldens, deploy/base, the CRD, the examples, and the
# example CRs against the CRD's own schema.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0'
fi
cargo build --quiet --bin hostpath-csi
bin="${CARGO_TARGET_DIR:-target}/debug/hostpath-csi"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for cr in deploy/examples/hpp-*.yaml tests/golden/inputs/*.yaml; do
  "$bin" render --cr "$cr" --nodes node-a,node-b.example.com >"$out/rendered-$(basename "$cr")"
done
python3 hack/validate_k8s.py --crd deploy/crd/hostpathprovisioner.yaml \
  "$out"/*.yaml tests/golden/*.yaml deploy/base/*.yaml deploy/crd/*.yaml deploy/examples/*.yaml \
  tests/golden/inputs/*.yaml
