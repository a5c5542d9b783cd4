"""The generated CRD reference (docs/crd-reference.md): current, complete, and checked by the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from forgeline_operator.api import FineTuneJob, JobStatus, TrainingJob
from forgeline_operator.api.crd import render_crds
from forgeline_operator.api.reference import render_reference
from forgeline_operator.cli.main import main as cli

from .conftest import CRDS, REPO

DOC = REPO / "docs" / "crd-reference.md"
JOBS = (TrainingJob, FineTuneJob)


def _sections(text: str) -> dict[str, str]:
    """anchor id → the text of its section (up to the next anchor)."""
    parts = re.split(r'<a id="([^"]+)"></a>', text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _anchor(kind: str, path: str) -> str:
    return f"{kind.lower()}-" + re.sub(r"[^a-z0-9]+", "-", path.replace("[]", "").lower()).strip("-")


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model inside an annotation (Optional, list[...]) and the path suffix to reach its fields."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            model, suffix = _nested_model(arg)
            if model is not None:
                return model, suffix
        return None, ""
    if origin is list:
        model, suffix = _nested_model(typing.get_args(annotation)[0])
        return model, "[]" + suffix
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    return None, ""


def _model_fields(model: type[BaseModel], path: str) -> Iterator[tuple[str, str]]:
    """(parent path, camelCase field name) of every field of a model and of its nested models,
    walked from the pydantic models themselves (not from the CRD schema the doc is made from)."""
    for name, info in model.model_fields.items():
        alias = info.alias or name
        yield path, alias
        nested, suffix = _nested_model(info.annotation)
        if nested is not None:
            yield from _model_fields(nested, f"{path}.{alias}{suffix}")


def test_committed_reference_matches_the_models() -> None:
    assert DOC.read_text() == render_reference(), (
        "docs/crd-reference.md is out of date with the models: run `make crds`"
    )


def test_reference_is_made_from_the_installed_crds() -> None:
    """Every constraint the reference shows comes from the CRD YAML, e.g. the job-name limit."""
    text = render_reference()
    for name, crd_text in render_crds().items():
        crd = yaml.safe_load(crd_text)
        names = crd["spec"]["names"]
        assert f"## {names['kind']}" in text
        assert f"`{names['shortNames'][0]}`" in text
        assert f"`crds/{name}`" in text
        meta = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"]
        assert f"length ≤ {meta['properties']['name']['maxLength']}" in text
        for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
            assert f"`{column['jsonPath']}`" in text


@pytest.mark.parametrize("job", JOBS, ids=lambda j: j.KIND)
def test_every_spec_field_is_documented(job: type[TrainingJob] | type[FineTuneJob]) -> None:
    sections = _sections(render_reference())
    spec_model = job.model_fields["spec"].annotation
    fields = list(_model_fields(spec_model, "spec"))
    assert len(fields) > 50
    missing = []
    for parent, name in fields:
        section = sections.get(_anchor(job.KIND, parent))
        if section is None or f"| `{name}` |" not in section:
            missing.append(f"{parent}.{name}")
    assert not missing, f"{job.KIND} fields missing from the reference: {missing}"


@pytest.mark.parametrize("job", JOBS, ids=lambda j: j.KIND)
def test_status_fields_and_printer_columns_are_documented(job: type[TrainingJob] | type[FineTuneJob]) -> None:
    sections = _sections(render_reference())
    for parent, name in _model_fields(JobStatus, "status"):
        assert f"| `{name}` |" in sections[_anchor(job.KIND, parent)], f"{parent}.{name}"
    columns = sections[f"{job.KIND.lower()}-printer-columns"]
    for column in ("Phase", "Progress", "Loss", "Restarts", "Reason", "Age"):
        assert f"| {column} |" in columns


def test_reference_details_are_rendered() -> None:
    sections = _sections(render_reference())
    checkpointing = sections["trainingjob-spec-checkpointing"]
    assert "| `resume` | `string`<br>one of `auto`, `never` | `auto` | no |" in checkpointing
    lr = next(
        line
        for line in sections["finetunejob-spec-training"].splitlines()
        if line.startswith("| `learningRate` |")
    )
    assert "> 0, < 1" in lr and "`0.0002`" in lr
    assert (
        "| `sources` | array of [`object`](#trainingjob-spec-data-sources)"
        in (sections["trainingjob-spec-data"])
    )
    assert "| yes |" in sections["trainingjob-spec-data-sources"]  # uri is required
    ray = sections["finetunejob-spec-ray"]
    assert r"pattern `^(https?\|ray)://" in ray  # a pipe in a pattern does not break the table
    # Every in-page link points at a section that exists.
    text = render_reference()
    anchors = set(_sections(text))
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= anchors, sorted(links - anchors)


def _copies(tmp_path: Path) -> tuple[Path, Path]:
    crds = tmp_path / "crds"
    shutil.copytree(CRDS, crds)
    doc = tmp_path / "docs" / "crd-reference.md"
    doc.parent.mkdir()
    shutil.copy(DOC, doc)
    return crds, doc


def test_check_passes_on_the_committed_files(tmp_path: Path) -> None:
    crds, doc = _copies(tmp_path)
    assert cli(["crds", "--dir", str(crds), "--docs", str(doc), "--check"]) == 0


def test_check_detects_a_modified_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crds, doc = _copies(tmp_path)
    doc.write_text(doc.read_text().replace("| `keep` |", "| `keepLast` |", 1))
    assert cli(["crds", "--dir", str(crds), "--docs", str(doc), "--check"]) == 1
    err = capsys.readouterr().err
    assert "out of date:" in err and str(doc) in err and "run `make crds`" in err
    assert "forgeline.dev_" not in err.split(";")[0]  # the CRDs themselves are current
    # A missing reference is out of date too; writing it fixes both.
    doc.unlink()
    assert cli(["crds", "--dir", str(crds), "--docs", str(doc), "--check"]) == 1
    assert cli(["crds", "--dir", str(crds), "--docs", str(doc)]) == 0
    assert doc.read_text() == render_reference()
    assert cli(["crds", "--dir", str(crds), "--docs", str(doc), "--check"]) == 0


def test_check_without_docs_ignores_the_reference(tmp_path: Path) -> None:
    crds, doc = _copies(tmp_path)
    doc.write_text("stale\n")
    assert cli(["crds", "--dir", str(crds), "--check"]) == 0


def test_console_script_checks_the_reference(tmp_path: Path) -> None:
    """`forgeline crds --check --docs ...` as `make crds` users run it: exit 0, then 1 on a copy."""
    exe = shutil.which("forgeline") or str(Path(sys.executable).parent / "forgeline")
    crds, doc = _copies(tmp_path)
    argv = [exe, "crds", "--check", "--dir", str(crds), "--docs", str(doc)]
    ok = subprocess.run(argv, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    doc.write_text(doc.read_text() + "\nhand edit\n")
    stale = subprocess.run(argv, capture_output=True, text=True)
    assert stale.returncode == 1
    assert "out of date:" in stale.stderr and "run `make crds`" in stale.stderr
