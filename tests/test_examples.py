"""Every shipped example is valid for `forgeline validate` and for the real apiserver."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from forgeline_operator.api import parse_job

from .conftest import EXAMPLES, Cluster, example_files, load_yaml_documents

FILES = example_files()


def test_every_method_has_a_tiny_example() -> None:
    docs = [d for p in EXAMPLES.glob("*.yaml") for d in load_yaml_documents(p)]
    methods = {d["spec"]["method"] for d in docs if d["kind"] == "FineTuneJob"}
    assert {"full", "lora", "qlora", "prompt-tuning", "reward-model", "dpo", "merge"} <= methods
    assert methods & {"ppo", "grpo"}
    tjs = [d["spec"] for d in docs if d["kind"] == "TrainingJob"]
    assert {"llama", "gpt2", "mixtral", "bert"} <= {s["model"].get("architecture") for s in tjs}
    assert any("initFrom" in s["model"] for s in tjs), "no continued-pretraining example"
    assert {2, 3} <= {s.get("deepspeed", {}).get("zeroStage") for s in tjs}
    assert len(list((EXAMPLES / "production").glob("*.yaml"))) >= 2


def test_forgeline_validate_accepts_all_examples() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "forgeline_operator.cli.main", "validate", *map(str, FILES)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 invalid" in proc.stdout


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_example_parses(path: Path) -> None:
    for doc in load_yaml_documents(path):
        job = parse_job(doc)
        assert job.metadata.name == doc["metadata"]["name"]


def test_tiny_examples_are_cpu_sized() -> None:
    for path in EXAMPLES.glob("*.yaml"):
        for doc in load_yaml_documents(path):
            spec = parse_job(doc).spec
            assert spec.resources.gpus_per_worker == 0, path.name
            workers = 1 if getattr(spec, "method", None) == "merge" else 2  # a merge trains nothing
            assert spec.resources.workers == workers, f"{path.name}: tests run examples on two Ray workers"
            assert (spec.training.max_steps or 0) <= 100, path.name


@pytest.mark.cluster
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_apiserver_accepts_example(path: Path, cluster: Cluster, namespace: str) -> None:
    for doc in load_yaml_documents(path):
        doc["metadata"]["namespace"] = namespace
        cluster.kubectl("create", "-f", "-", input=json.dumps(doc))
        kind = doc["kind"].lower()
        stored = json.loads(
            cluster.kubectl("get", kind, doc["metadata"]["name"], "-n", namespace, "-o", "json").stdout
        )
        # Nothing the user wrote was pruned or changed by the CRD schema.
        assert parse_job(stored).spec == parse_job(doc).spec
