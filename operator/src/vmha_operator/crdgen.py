"""Generate the VMGroup CustomResourceDefinition from the pydantic models in `api.py`.

    python -m vmha_operator.crdgen            # writes crds/vmgroups.vmha.io.yaml
    python -m vmha_operator.crdgen --check    # exit 1 when the file differs from the models

Pydantic emits JSON Schema (2020-12); a CRD needs a *structural* OpenAPI v3 schema: no `$ref`,
no `anyOf` for optional fields, no `title`, no `null` defaults. This module converts one into
the other and refuses constructs it does not know how to convert, so a model change that the
CRD cannot express fails loudly here instead of producing a subtly different schema.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from vmha_operator import api

DEFAULT_OUTPUT = Path("crds") / f"{api.CRD_NAME}.yaml"

# JSON Schema keywords that have the same meaning in a structural CRD schema.
_KEPT_KEYWORDS = frozenset(
    {
        "type",
        "description",
        "properties",
        "required",
        "items",
        "enum",
        "default",
        "format",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "pattern",
    }
)
# Keywords dropped on purpose: titles are noise, additionalProperties=false is not allowed
# in structural schemas (unknown fields are pruned by the apiserver anyway).
_DROPPED_KEYWORDS = frozenset({"title", "additionalProperties"})


class SchemaConversionError(ValueError):
    """The model uses a JSON Schema construct that has no structural equivalent here."""


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model, with `$ref`s inlined."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    definitions = raw.get("$defs", {})
    return _convert(raw, definitions)


def _convert(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    node = _resolve(node, definitions)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYWORDS or key == "$defs":
            continue
        if key.startswith("x-kubernetes-"):
            out[key] = copy.deepcopy(value)
        elif key == "properties":
            out[key] = {name: _convert(prop, definitions) for name, prop in value.items()}
        elif key == "items":
            out[key] = _convert(value, definitions)
        elif key == "default":
            if value is not None:
                out[key] = copy.deepcopy(value)
        elif key in _KEPT_KEYWORDS:
            out[key] = copy.deepcopy(value)
        else:
            raise SchemaConversionError(f"unsupported JSON Schema keyword {key!r} in {node!r}")
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "type" not in out:
        raise SchemaConversionError(f"schema without a type: {node!r}")
    return _ordered(out)


_LEADING_KEYS = ("type", "description")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Type and description first, the rest alphabetically: a stable, readable file."""
    leading = [key for key in _LEADING_KEYS if key in node]
    rest = sorted(key for key in node if key not in _LEADING_KEYS)
    return {key: node[key] for key in [*leading, *rest]}


def _resolve(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """Inline a `$ref` and collapse `anyOf: [X, null]` (an optional field) into X."""
    if "$ref" in node:
        target = definitions[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, definitions)
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        if len(variants) != 1 or len(node["anyOf"]) != 2:
            raise SchemaConversionError(f"only Optional[X] unions are supported: {node!r}")
        merged = {**variants[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        return _resolve(merged, definitions)
    if "const" in node:
        raise SchemaConversionError(f"single-value Literal is not supported: {node!r}")
    return node


def vmgroup_crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition object for VMGroup."""
    spec_schema = openapi_schema(api.VMGroupSpec)
    spec_schema["description"] = (api.VMGroupSpec.__doc__ or "").strip()
    status_schema = openapi_schema(api.VMGroupStatus)
    status_schema["description"] = (api.VMGroupStatus.__doc__ or "").strip()
    root = {
        "type": "object",
        "description": "A group of KubeVirt VirtualMachines placed by a Nova server group "
        "policy, with vmha guest heartbeat and server group messaging. Members are the "
        f"VirtualMachines in the same namespace labelled {api.GROUP_LABEL}=<name>.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": api.CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "vmha"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["vmha"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(api.PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


HEADER = (
    "# Generated by `python -m vmha_operator.crdgen` from operator/src/vmha_operator/api.py.\n"
    "# Do not edit: change the models and regenerate (a unit test compares the two).\n"
)


def render_crd_yaml() -> str:
    body = yaml.safe_dump(vmgroup_crd(), sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", "-o", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--check", action="store_true", help="compare instead of writing; exit 1 on difference"
    )
    args = parser.parse_args(argv)
    text = render_crd_yaml()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python -m vmha_operator.crdgen")
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
