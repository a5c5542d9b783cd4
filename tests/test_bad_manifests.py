"""The bad-manifest corpus: each file is rejected by `forgeline validate` with an error on the
field its header names, and — where the CRD schema can express the rule — by the apiserver too.

Header of each file in tests/bad_manifests/:
    # <what is wrong>
    # expect: <dotted field path forgeline validate must name>
    # apiserver: reject | accept   (accept = a rule a structural schema cannot express)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from forgeline_operator.api import InvalidJobError, parse_job
from forgeline_operator.cli.main import main as cli

from .conftest import Cluster, load_yaml_documents

CORPUS = sorted((Path(__file__).parent / "bad_manifests").glob("*.yaml"))


def _header(path: Path) -> tuple[str, str]:
    text = path.read_text()
    expect = re.search(r"^# expect: (\S+)$", text, re.M)
    server = re.search(r"^# apiserver: (reject|accept)$", text, re.M)
    assert expect and server, f"{path.name} lacks its expect/apiserver header"
    return expect.group(1), server.group(1)


def test_corpus_is_large_and_varied() -> None:
    assert len(CORPUS) >= 30
    verdicts = [_header(p)[1] for p in CORPUS]
    assert verdicts.count("reject") >= 15 and verdicts.count("accept") >= 10


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_validate_names_the_field(path: Path) -> None:
    expect, _ = _header(path)
    (doc,) = load_yaml_documents(path)
    with pytest.raises(InvalidJobError) as info:
        parse_job(doc)
    paths = [e.path for e in info.value.errors]
    assert expect in paths, f"expected an error on {expect}, got {info.value.errors}"
    hit = next(e for e in info.value.errors if e.path == expect)
    assert hit.message and hit.fix, f"{expect}: error without a message or a fix: {hit}"


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_cli_fails_and_prints_the_field(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect, _ = _header(path)
    assert cli(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert expect in out and "fix:" in out


@pytest.mark.cluster
@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_apiserver_agrees_where_the_schema_can_say(path: Path, cluster: Cluster, namespace: str) -> None:
    """Differential: the real apiserver rejects what the CRD schema can express, naming the field;
    the rest (cross-field rules, typos it prunes) it accepts — which is why `forgeline validate`
    and the operator's ValidationFailed exist."""
    expect, verdict = _header(path)
    (doc,) = load_yaml_documents(path)
    doc["metadata"]["namespace"] = namespace
    # --validate=false: judge the apiserver alone, not kubectl's client-side schema check.
    proc = cluster.kubectl(
        "create",
        "--dry-run=server",
        "--validate=false",
        "-o",
        "json",
        "-f",
        "-",
        input=json.dumps(doc),
        check=False,
    )
    if verdict == "accept":
        assert proc.returncode == 0, f"apiserver rejected what we expected it to accept:\n{proc.stderr}"
        return
    assert proc.returncode != 0, f"apiserver accepted {path.name}"
    leaf = re.sub(r"\[\d+\]", "", expect).split(".")[-1]
    named = "version" if leaf == "apiVersion" else leaf  # kubectl: no kind "X" in version "..."
    assert named in proc.stderr, f"apiserver's error does not name {leaf}:\n{proc.stderr}"


@pytest.mark.cluster
def test_kubectl_rejects_unknown_fields_from_the_published_schema(cluster: Cluster, namespace: str) -> None:
    """A 1.20 apiserver prunes unknown fields silently; kubectl's own validation against the CRD's
    published OpenAPI (on by default) still stops the typo before it is stored."""
    (doc,) = load_yaml_documents(Path(__file__).parent / "bad_manifests" / "tj-unknown-field-typo.yaml")
    doc["metadata"]["namespace"] = namespace
    proc = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(doc), check=False)
    assert proc.returncode != 0 and "learningrate" in proc.stderr
