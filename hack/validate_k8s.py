#!/usr/bin/env python3
"""Validates Kubernetes YAML documents against the OpenAPI schemas of a
Kubernetes release (PyPI package kubernetes-validate, strict: unknown fields
fail), and HostPathProvisioner CRs against the schema of our CRD.

Usage: validate_k8s.py --crd deploy/crd/hostpathprovisioner.yaml FILE...
Kinds with no schema in either place are skipped with a notice.
"""
import argparse
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kv


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
                schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


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
    parser.add_argument("--kubernetes-version", default=kv.latest_version())
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    version = args.kubernetes_version
    self_test(version)
    custom = {}
    for path in args.crd:
        custom.update(crd_schemas(path))

    passed = failed = skipped = 0
    for path in args.files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        for doc in docs:
            what = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            key = (doc.get("apiVersion"), doc.get("kind"))
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
    print(f"validate-render: {passed} passed, {failed} failed, {skipped} skipped "
          f"(Kubernetes {version})")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
