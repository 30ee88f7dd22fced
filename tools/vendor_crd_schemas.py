"""Copy the OpenAPI schema of a custom resource out of its upstream CRD, for the offline checks.

    python tools/vendor_crd_schemas.py CRD.yaml VERSION OUT.json --source "owner/repo@tag path (licence)"

Reads one CustomResourceDefinition (a file of the upstream release, e.g. from a checkout of its
repository at the tag), takes `spec.versions[name == VERSION].schema.openAPIV3Schema`, drops the
`description` texts (most of the size; the checks need the structure only) and writes it as JSON
with its source under `x-vendored-from`. tests/deploy/deploy_checks.py validates the rendered
custom resources against these files, strictly (see `strict_schema` there).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        # `description` is a schema keyword only where its value is text; a property named
        # "description" (an object schema) is kept.
        return {
            key: without_descriptions(value)
            for key, value in node.items()
            if not (key == "description" and isinstance(value, str))
        }
    if isinstance(node, list):
        return [without_descriptions(item) for item in node]
    return node


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("crd", type=Path)
    parser.add_argument("version")
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--source", required=True, help="where the CRD came from: repository@tag path (licence)"
    )
    args = parser.parse_args()
    crd = next(doc for doc in yaml.safe_load_all(args.crd.read_text()) if doc)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == args.version]
    schema = without_descriptions(version["schema"]["openAPIV3Schema"])
    schema["x-vendored-from"] = args.source
    schema["x-kind"] = f"{crd['spec']['group']}/{args.version} {crd['spec']['names']['kind']}"
    args.out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
