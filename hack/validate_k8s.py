#!/usr/bin/env python3
"""Validates Kubernetes YAML documents against the OpenAPI schemas of a
Kubernetes release (PyPI package kubernetes-validate, strict: unknown fields
fail), and custom resources (HostPathProvisioner, SecurityContextConstraints,
ServiceMonitor, PrometheusRule) against the schemas of the CRDs given with
--crd, read as the API server reads them: `nullable` allows null, int-or-string
fields take both, and objects with listed properties are closed unless they
preserve unknown fields (kubectl's strict field validation).

Usage: validate_k8s.py --crd CRD.yaml [--crd ...] [--require-kind KIND ...] FILE...
Kinds with no schema are skipped with a notice; a --require-kind that was
never validated fails the run.
"""
import argparse
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kv


def structural(schema):
    """An OpenAPI v3 CRD schema as a JSON schema the way the API server
    applies it (see the module docstring)."""
    if isinstance(schema, list):
        return [structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: structural(v) for k, v in schema.items()
           if k not in ("nullable", "description")}
    if (out.get("type") == "object" and "properties" in out
            and "additionalProperties" not in out
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if schema.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def crd_schemas(path):
    """(apiVersion, kind) -> JSON schema, from a CRD file."""
    schemas = {}
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                schemas[key] = structural(version["schema"]["openAPIV3Schema"])
    return schemas


def self_test_custom(custom):
    """Each custom schema must reject an unknown field, or it checks nothing."""
    for (api_version, kind), schema in custom.items():
        bad = {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"},
               "bogusField": 1}
        try:
            jsonschema.validate(bad, schema)
        except jsonschema.ValidationError:
            continue
        sys.exit(f"validate_k8s: self-test failed: {kind} accepted an unknown field")


def self_test(version):
    """The validator must reject a bad document, or a green run means nothing."""
    bad = {"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "x"}, "spec": {"replicas": "one", "bogus": 1}}
    try:
        kv.validate(bad, version, True)
    except kv.ValidationError:
        return
    sys.exit("validate_k8s: self-test failed: a broken Deployment was accepted")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--crd", action="append", default=[])
    parser.add_argument("--require-kind", action="append", default=[])
    # KIND.FIELD: a top-level field known to be misplaced in a document that
    # must stay verbatim (a seed from the product docs); dropped with a note.
    parser.add_argument("--ignore-field", action="append", default=[])
    parser.add_argument("--kubernetes-version", default=kv.latest_version())
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    version = args.kubernetes_version
    self_test(version)
    custom = {}
    for path in args.crd:
        custom.update(crd_schemas(path))
    self_test_custom(custom)
    seen = set()

    passed = failed = skipped = 0
    for path in args.files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        for doc in docs:
            what = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            key = (doc.get("apiVersion"), doc.get("kind"))
            for ignored in args.ignore_field:
                kind, field = ignored.split(".", 1)
                if doc.get("kind") == kind and field in doc:
                    print(f"NOTE {what}: top-level {field} ignored (--ignore-field)")
                    doc = {k: v for k, v in doc.items() if k != field}
            try:
                if key in custom:
                    jsonschema.validate(doc, custom[key])
                else:
                    kv.validate(doc, version, True)
            except kv.SchemaNotFoundError:
                print(f"SKIP {what}: {key[0]} {key[1]} is not a Kubernetes {version} kind")
                skipped += 1
                continue
            except (kv.ValidationError, jsonschema.ValidationError) as e:
                print(f"FAIL {what}: {e.message} at {'.'.join(map(str, e.absolute_path))}")
                failed += 1
                continue
            passed += 1
            seen.add(key[1])
    for kind in args.require_kind:
        if kind not in seen:
            print(f"FAIL no {kind} was validated")
            failed += 1
    print(f"validate-render: {passed} passed, {failed} failed, {skipped} skipped "
          f"(Kubernetes {version})")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
