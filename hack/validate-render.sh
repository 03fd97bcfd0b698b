#!/usr/bin/env bash
# Renders every example CR (vanilla, with --monitoring, and for OpenShift)
# and checks each document against the Kubernetes schemas (PyPI
# kubernetes-validate, newest release it knows, strict), plus the checked-in
# goldens, deploy/base, the CRD, the examples, and the custom resources
# against their CRDs: the HostPathProvisioner CRD, and for the SCC and the
# monitoring objects the schemas in tests/schemas/ (or the real CRDs, given
# as space-separated paths in EXTRA_CRDS). The documentation's seed CR with
# `workload` at the top level is kept verbatim; that one field is ignored.
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
  name=$(basename "$cr")
  "$bin" render --cr "$cr" --nodes node-a,node-b.example.com >"$out/rendered-$name"
  "$bin" render --cr "$cr" --nodes node-a,node-b.example.com --monitoring >"$out/rendered-monitoring-$name"
  "$bin" render --cr "$cr" --nodes node-a,node-b.example.com --platform openshift \
    --namespace openshift-cnv >"$out/rendered-openshift-$name"
done
crds=(--crd deploy/crd/hostpathprovisioner.yaml --crd tests/schemas/security.openshift.io.yaml
  --crd tests/schemas/monitoring.coreos.com.yaml --crd tests/schemas/cdi.kubevirt.io.yaml)
for extra in ${EXTRA_CRDS:-}; do
  crds+=(--crd "$extra")
done
python3 hack/validate_k8s.py "${crds[@]}" \
  --require-kind SecurityContextConstraints --require-kind ServiceMonitor \
  --require-kind PrometheusRule --require-kind HostPathProvisioner --require-kind StorageProfile \
  --ignore-field HostPathProvisioner.workload \
  "$out"/*.yaml tests/golden/*.yaml tests/golden/openshift/*.yaml deploy/base/*.yaml \
  deploy/crd/*.yaml deploy/examples/*.yaml tests/golden/inputs/*.yaml
