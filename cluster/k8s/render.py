#!/usr/bin/env python3
"""Renders a kustomization of cluster/k8s offline, for the tests (clusters
use `kubectl apply -k`). It implements exactly the part of Kustomize these
manifests use, and refuses anything else:

- `resources`: YAML files, or directories holding a kustomization.yaml;
- `configMapGenerator` with `files`, under `disableNameSuffixHash: true`;
- `labels` with `includeSelectors: false` (metadata labels only);
- `patches` with a `target` (group, version, kind, name) and an inline
  JSON 6902 patch, applied with the `jsonpatch` package (RFC 6902, the same
  semantics Kustomize follows).

Prints the resources as one JSON list.
"""

import json
import os
import sys

import jsonpatch
import yaml

KNOWN = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "labels",
    "patches",
}


def fail(message):
    sys.exit(f"render.py: {message}")


def render(directory):
    path = os.path.join(directory, "kustomization.yaml")
    with open(path) as f:
        k = yaml.safe_load(f)
    unknown = set(k) - KNOWN
    if unknown:
        fail(f"{path}: unsupported fields {sorted(unknown)}")
    out = []
    for resource in k.get("resources", []):
        where = os.path.join(directory, resource)
        if os.path.isdir(where):
            out.extend(render(where))
        else:
            with open(where) as f:
                out.extend(doc for doc in yaml.safe_load_all(f) if doc)
    generators = k.get("configMapGenerator", [])
    if generators and not k.get("generatorOptions", {}).get("disableNameSuffixHash"):
        fail(f"{path}: name hashes are not rendered; set disableNameSuffixHash")
    for g in generators:
        data = {}
        for name in g.get("files", []):
            with open(os.path.join(directory, name)) as f:
                data[os.path.basename(name)] = f.read()
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": g["name"]},
                "data": data,
            }
        )
    for entry in k.get("labels", []):
        if entry.get("includeSelectors", False) or entry.get("includeTemplates", False):
            fail(f"{path}: only metadata labels are rendered")
        for doc in out:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    for p in k.get("patches", []):
        target = p["target"]
        ops = yaml.safe_load(p["patch"])
        matched = 0
        for i, doc in enumerate(out):
            group, _, version = doc["apiVersion"].rpartition("/")
            if (
                target.get("group", group) == group
                and target.get("version", version) == version
                and target.get("kind", doc["kind"]) == doc["kind"]
                and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
            ):
                out[i] = jsonpatch.apply_patch(doc, ops)
                matched += 1
        if matched == 0:
            fail(f"{path}: the patch for {target} matches nothing")
    return out


if __name__ == "__main__":
    print(json.dumps(render(sys.argv[1]), indent=1))
