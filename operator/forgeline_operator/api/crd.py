"""Generate the CustomResourceDefinitions in `crds/` from the pydantic models.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 schema: every node
typed, no `$ref`, no `anyOf` over types, `exclusiveMinimum` as a boolean, no `additionalProperties:
false`, no titles. `openapi_schema()` does that translation; `build_crd()` wraps it in a CRD with
the status subresource, printer columns, short names and the `forgeline` category.

Regenerate with `forgeline crds` (or `make crds`); `tests/test_crds.py` fails if `crds/` drifts.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from ._base import API_GROUP, API_VERSION, ApiModel
from .resources import JOB_NAME_PATTERN, MAX_JOB_NAME_LENGTH, FineTuneJob, TrainingJob
from .status import JobStatus

_DROP_KEYS = {"title", "$defs", "discriminator", "examples"}
_OPENAPI_FORMATS = {"date-time", "date", "int32", "int64", "float", "double", "byte", "uri"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every `$ref` (our models have no recursion)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return _resolve({**target, **extra}, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


_CONSTRAINTS = (
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "default",
)


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Turn one resolved JSON-Schema node into a structural OpenAPI v3 node."""
    node = _merge_combinators(dict(node))
    out: dict[str, Any] = {}
    if "description" in node:
        out["description"] = " ".join(str(node["description"]).split())
    if node.get("x-kubernetes-int-or-string"):
        out["x-kubernetes-int-or-string"] = True
        if "pattern" in node:
            out["pattern"] = node["pattern"]
        if node.get("default") is not None:
            out["default"] = node["default"]
        return out
    typ = node.get("type")
    if "const" in node:
        node.setdefault("enum", [node["const"]])
    if typ is None and "enum" in node:
        typ = {bool: "boolean", int: "integer", float: "number"}.get(type(node["enum"][0]), "string")
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if typ is None and not preserve:
        raise ValueError(f"schema node without a type: {node}")
    if typ is not None:
        out["type"] = typ
    out.update(_constraints(node))
    if preserve:
        out["x-kubernetes-preserve-unknown-fields"] = True
    out.update(_children(node, typ, preserve))
    return {k: v for k, v in out.items() if k not in _DROP_KEYS}


def _merge_combinators(node: dict[str, Any]) -> dict[str, Any]:
    """Optional fields (`anyOf` with null) become the one non-null option; `allOf` parts merge."""
    for key in ("anyOf", "oneOf"):
        if key in node:
            options = [o for o in node.pop(key) if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express a union of {options} in a structural schema")
            return _merge_combinators({**options[0], **node})
    if "allOf" in node:
        merged: dict[str, Any] = {}
        for part in node.pop("allOf"):
            merged.update(part)
        return _merge_combinators({**merged, **node})
    return node


def _constraints(node: dict[str, Any]) -> dict[str, Any]:
    """Value constraints in OpenAPI v3 form (exclusive bounds as a flag, known formats only)."""
    out = {k: node[k] for k in _CONSTRAINTS if k in node and not (k == "default" and node[k] is None)}
    if "exclusiveMinimum" in node:
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True
    if node.get("format") in _OPENAPI_FORMATS:
        out["format"] = node["format"]
    return out


def _children(node: dict[str, Any], typ: str | None, preserve: bool) -> dict[str, Any]:
    """An object's properties (or its map values) and an array's items, made structural."""
    out: dict[str, Any] = {}
    if typ == "object":
        if "properties" in node:
            out["properties"] = {k: _structural(v) for k, v in node["properties"].items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(node.get("additionalProperties"), dict) and not preserve:
            out["additionalProperties"] = _structural(node["additionalProperties"])
        elif not preserve:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if typ == "array":
        out["items"] = _structural(node.get("items", {"x-kubernetes-preserve-unknown-fields": True}))
    return out


@cache
def _openapi_cached(model: type[ApiModel]) -> str:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return yaml.safe_dump(_structural(_resolve(raw, defs)))


def openapi_schema(model: type[ApiModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model (a fresh copy each call)."""
    return yaml.safe_load(_openapi_cached(model))


def _without_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


_COMMON_COLUMNS_HEAD = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase"},
]
_COMMON_COLUMNS_TAIL = [
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress.summary",
        "description": "Optimizer steps done / planned",
    },
    {
        "name": "Loss",
        "type": "string",
        "jsonPath": ".status.progress.display.loss",
        "description": "Latest training loss (3 significant digits)",
    },
    {
        "name": "Eval",
        "type": "string",
        "jsonPath": ".status.progress.display.eval",
        "description": "Held-out metric before → after training",
    },
    {
        "name": "Cost",
        "type": "string",
        "jsonPath": ".status.cost.display",
        "description": "Spent → projected at the current pace (GPU jobs)",
    },
    {
        "name": "Goodput",
        "type": "string",
        "jsonPath": ".status.goodput.display",
        "description": "Productive steps' share of the time the job held its chips (and its largest badput)",
    },
    {
        "name": "Tokens/s",
        "type": "string",
        "jsonPath": ".status.progress.display.tokensPerSecond",
        "priority": 1,
        "description": "Training throughput",
    },
    {
        "name": "MFU",
        "type": "string",
        "jsonPath": ".status.progress.display.mfu",
        "priority": 1,
        "description": "Model FLOPs utilisation",
    },
    {
        "name": "Restarts",
        "type": "integer",
        "jsonPath": ".status.restarts",
        "priority": 1,
        "description": "Ray job resubmissions",
    },
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": ".status.reason",
        "priority": 1,
        "description": "Why the job is in its phase",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _kind_columns(job: type[TrainingJob] | type[FineTuneJob]) -> list[dict[str, Any]]:
    if job is TrainingJob:
        return [
            {
                "name": "Model",
                "type": "string",
                "jsonPath": ".spec.model.architecture",
                "description": "Architecture of a fresh model",
            },
            {"name": "Objective", "type": "string", "jsonPath": ".spec.objective", "priority": 1},
        ]
    return [
        {
            "name": "Method",
            "type": "string",
            "jsonPath": ".spec.method",
            "description": "Fine-tuning method",
        },
    ]


def _object_schema(job: type[TrainingJob] | type[FineTuneJob]) -> dict[str, Any]:
    """The whole object's openAPIV3Schema: metadata.name bounds, the spec, the status."""
    spec_model = job.model_fields["spec"].annotation
    return {
        "type": "object",
        "description": (job.__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": MAX_JOB_NAME_LENGTH,
                        "pattern": JOB_NAME_PATTERN,
                    },
                },
            },
            "spec": openapi_schema(spec_model),
            "status": _without_defaults(openapi_schema(JobStatus)),  # the operator writes status whole
        },
    }


def build_crd(job: type[TrainingJob] | type[FineTuneJob]) -> dict[str, Any]:
    """The CustomResourceDefinition manifest for one job kind."""
    version = {
        "name": API_VERSION,
        "served": True,
        "storage": True,
        "subresources": {"status": {}},
        "additionalPrinterColumns": _COMMON_COLUMNS_HEAD + _kind_columns(job) + _COMMON_COLUMNS_TAIL,
        "schema": {"openAPIV3Schema": _object_schema(job)},
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{job.PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": job.KIND,
                "listKind": f"{job.KIND}List",
                "plural": job.PLURAL,
                "singular": job.KIND.lower(),
                "shortNames": [job.SHORT_NAME],
                "categories": ["forgeline"],
            },
            "scope": "Namespaced",
            "versions": [version],
        },
    }


CRD_FILES = {
    TrainingJob: "forgeline.dev_trainingjobs.yaml",
    FineTuneJob: "forgeline.dev_finetunejobs.yaml",
}
_HEADER = "# Generated by `forgeline crds` from forgeline_operator.api; do not edit by hand.\n"


def render_crds() -> dict[str, str]:
    """File name → YAML text of every CRD."""
    return {
        name: _HEADER + yaml.safe_dump(build_crd(job), sort_keys=False, width=100)
        for job, name in CRD_FILES.items()
    }


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_crds().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
