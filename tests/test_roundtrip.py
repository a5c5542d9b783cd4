"""Property tests: the models and the generated CRD schema agree, and specs round-trip.

Hypothesis draws specs from the CRD's own structural OpenAPI schema. For every
draw, the pydantic model must either accept it, or reject it only for cross-field rules (which a
1.20 structural schema cannot express). Whatever the model accepts must round-trip
model → JSON → model unchanged, and its JSON must again satisfy the CRD schema.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from forgeline_operator.api import FineTuneJobSpec, TrainingJobSpec
from forgeline_operator.api._base import RULES_ERROR_TYPE
from forgeline_operator.api.crd import openapi_schema

from .conftest import example_files, load_yaml_documents


def strategy_for(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A Hypothesis strategy for the values one structural-schema node admits."""
    if node.get("x-kubernetes-int-or-string"):
        return st.one_of(st.integers(0, 10**6), st.from_regex(node["pattern"], fullmatch=True))
    if "enum" in node:
        return st.sampled_from(node["enum"])
    typ = node.get("type")
    if node.get("x-kubernetes-preserve-unknown-fields") and "properties" not in node:
        leaf = st.one_of(st.text(max_size=8), st.integers(-5, 5), st.booleans())
        free = st.dictionaries(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), leaf, max_size=2)
        return free if typ == "object" else st.lists(free, max_size=2)
    if typ == "boolean":
        return st.booleans()
    if typ in ("integer", "number"):
        lo, hi = node.get("minimum"), node.get("maximum")
        if typ == "integer":
            lo = None if lo is None else lo + (1 if node.get("exclusiveMinimum") else 0)
            hi = None if hi is None else hi - (1 if node.get("exclusiveMaximum") else 0)
            return st.integers(lo if lo is not None else -(10**6), hi if hi is not None else 10**9)
        return st.floats(
            lo if lo is not None else -1e6,
            hi if hi is not None else 1e9,
            exclude_min=bool(node.get("exclusiveMinimum")),
            exclude_max=bool(node.get("exclusiveMaximum")),
            allow_nan=False,
        )
    if typ == "string":
        if "pattern" in node:
            text = st.from_regex(node["pattern"], fullmatch=True)
        else:
            text = st.text(
                st.characters(codec="utf-8", exclude_categories=("Cs",)),
                min_size=node.get("minLength", 0),
                max_size=24,
            )
        lo, hi = node.get("minLength", 0), node.get("maxLength", 10**6)
        return text.filter(lambda s: lo <= len(s) <= hi)
    if typ == "array":
        return st.lists(
            strategy_for(node["items"]),
            min_size=node.get("minItems", 0),
            max_size=min(node.get("maxItems", 3), 3),
        )
    if typ == "object" and "properties" in node:
        required = set(node.get("required", []))
        props = node["properties"]
        return st.fixed_dictionaries(
            {k: strategy_for(v) for k, v in props.items() if k in required},
            optional={k: strategy_for(v) for k, v in props.items() if k not in required},
        )
    if typ == "object":
        return st.dictionaries(
            st.from_regex(r"[a-z][a-z./-]{0,12}", fullmatch=True),
            strategy_for(node.get("additionalProperties", {"type": "string"})),
            max_size=2,
        )
    raise AssertionError(f"no strategy for schema node {node}")


def _validate_against(node: dict[str, Any], value: Any, path: str = "spec") -> None:
    """Check a value against a structural schema node (the subset the CRDs use)."""
    if node.get("x-kubernetes-int-or-string"):
        assert isinstance(value, (int, str)), path
        if isinstance(value, str):
            assert re.fullmatch(node["pattern"], value), path
        return
    if "enum" in node:
        assert value in node["enum"], f"{path}: {value!r} not in {node['enum']}"
    typ = node.get("type")
    checks = {
        "boolean": bool,
        "integer": int,
        "number": (int, float),
        "string": str,
        "array": list,
        "object": dict,
    }
    if typ:
        assert isinstance(value, checks[typ]), f"{path}: {value!r} is not {typ}"
    if typ in ("integer", "number"):
        if "minimum" in node:
            assert value > node["minimum"] if node.get("exclusiveMinimum") else value >= node["minimum"], path
        if "maximum" in node:
            assert value < node["maximum"] if node.get("exclusiveMaximum") else value <= node["maximum"], path
    if typ == "string":
        assert node.get("minLength", 0) <= len(value) <= node.get("maxLength", 10**9), path
        if "pattern" in node:
            assert re.search(node["pattern"], value), path
    if typ == "array":
        for i, item in enumerate(value):
            _validate_against(node.get("items", {}), item, f"{path}[{i}]")
    if typ == "object" and "properties" in node:
        missing = set(node.get("required", [])) - set(value)
        assert not missing, f"{path}: missing {missing}"
        for key, item in value.items():
            assert key in node["properties"] or node.get("x-kubernetes-preserve-unknown-fields"), (
                f"{path}.{key} is not in the schema"
            )
            if key in node["properties"]:
                _validate_against(node["properties"][key], item, f"{path}.{key}")


SPECS = {"TrainingJob": TrainingJobSpec, "FineTuneJob": FineTuneJobSpec}
SCHEMAS = {kind: openapi_schema(model) for kind, model in SPECS.items()}


def _check(kind: str, draw: dict[str, Any]) -> None:
    model = SPECS[kind]
    try:
        spec = model.model_validate(draw)
    except ValidationError as exc:
        field_errors = [
            e for e in exc.errors() if e["type"] != RULES_ERROR_TYPE and e["type"] != "storage_uri"
        ]
        assert not field_errors, (
            f"the CRD schema admits a {kind} spec the model rejects field by field:\n"
            f"{json.dumps(draw, indent=1)}\n{field_errors}"
        )
        return
    wire = spec.to_dict()
    _validate_against(SCHEMAS[kind], wire)  # what we emit, the CRD accepts
    again = model.model_validate(json.loads(json.dumps(wire)))
    assert again == spec
    assert again.to_dict() == wire


_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@_SETTINGS
@given(draw=strategy_for(SCHEMAS["TrainingJob"]))
def test_training_job_schema_and_model_agree(draw: dict[str, Any]) -> None:
    _check("TrainingJob", draw)


@_SETTINGS
@given(draw=strategy_for(SCHEMAS["FineTuneJob"]))
def test_finetune_job_schema_and_model_agree(draw: dict[str, Any]) -> None:
    _check("FineTuneJob", draw)


EXAMPLE_DOCS = [(path.name, doc) for path in example_files() for doc in load_yaml_documents(path)]


def _leaves(node: Any, schema: dict[str, Any], path: tuple = ()) -> list[tuple[tuple, dict[str, Any]]]:
    """(path, schema node) of every scalar in a spec that its schema types precisely."""
    if isinstance(node, dict) and "properties" in schema:
        out = []
        for key, value in node.items():
            out += _leaves(value, schema["properties"][key], path + (key,))
        return out
    if isinstance(node, list) and "items" in schema:
        out = []
        for i, value in enumerate(node):
            out += _leaves(value, schema["items"], path + (i,))
        return out
    if isinstance(node, (dict, list)):
        return []  # free-form (preserve-unknown-fields) content
    return [(path, schema)]


def _set(doc: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


@pytest.mark.parametrize(
    "name,doc", EXAMPLE_DOCS, ids=[f"{n}:{d['metadata']['name']}" for n, d in EXAMPLE_DOCS]
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_perturbed_examples_agree_and_round_trip(name: str, doc: dict[str, Any], data: st.DataObject) -> None:
    """Every example with a few of its values redrawn from the CRD schema: same agreement, and
    the ones the model accepts (most of them) round-trip."""
    kind, spec = doc["kind"], copy.deepcopy(doc["spec"])
    leaves = _leaves(spec, SCHEMAS[kind])
    chosen = data.draw(st.lists(st.sampled_from(leaves), min_size=1, max_size=4, unique_by=lambda x: x[0]))
    for path, node in chosen:
        _set(spec, path, data.draw(strategy_for(node), label=".".join(map(str, path))))
    _check(kind, spec)


@pytest.mark.parametrize("kind", list(SPECS))
def test_perturbation_mostly_yields_valid_specs(kind: str) -> None:
    """Guard against a vacuous round-trip property: most perturbed examples must be accepted."""
    accepted = total = 0

    @settings(max_examples=60, deadline=None, database=None)
    @given(data=st.data())
    def probe(data: st.DataObject) -> None:
        nonlocal accepted, total
        docs = [d for _, d in EXAMPLE_DOCS if d["kind"] == kind]
        spec = copy.deepcopy(data.draw(st.sampled_from(docs))["spec"])
        path, node = data.draw(st.sampled_from(_leaves(spec, SCHEMAS[kind])))
        _set(spec, path, data.draw(strategy_for(node)))
        total += 1
        try:
            SPECS[kind].model_validate(spec)
            accepted += 1
        except ValidationError:
            pass

    probe()
    assert total >= 30 and accepted / total > 0.5, f"{accepted}/{total} accepted"
