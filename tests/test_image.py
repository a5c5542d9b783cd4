"""The trainer image's pinned requirements resolve together (pip's resolver, for real), and the
Dockerfile installs them and the package the way the docs say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

REQS = REPO / "trainer_image" / "requirements.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in REQS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.split("[")[0].lower()] = version
    return pins


@pytest.mark.soak  # every make setup builds the image from these pins for real (make images)
def test_image_requirements_resolve(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "-q",
            "--report",
            str(report),
            "-r",
            str(REQS),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    for name, version in _pins().items():
        assert resolved.get(name, "").split("+")[0] == version, (
            f"{name}: pinned {version}, resolved {resolved.get(name)}"
        )


def test_pins_match_what_the_tests_train_with() -> None:
    """The image must run what the CPU suite verified: same versions in this environment."""
    from importlib.metadata import version

    for name, pinned in _pins().items():
        assert version(name).split("+")[0] == pinned, (
            f"{name}: image pins {pinned}, tests use {version(name)}"
        )


def test_dockerfile_uses_the_clusters_ray_and_the_pins() -> None:
    from forgeline_operator.api.common import RayTarget

    text = (REPO / "trainer_image" / "Dockerfile").read_text()
    ray_version = RayTarget().version
    # the production base is Ray's own image of the cluster's Ray version; the test cluster passes
    # a debootstrap base through the same build argument
    assert f"ARG BASE_IMAGE=rayproject/ray:{ray_version}-" in text
    assert "FROM ${BASE_IMAGE}" in text
    assert _pins()["ray"] == ray_version
    assert "pip install --no-cache-dir -r trainer_image/requirements.txt" in text
    assert "pip install --no-cache-dir --no-deps ." in text


def test_operator_dockerfile_matches_the_chart() -> None:
    """The operator image runs as the UID the chart's restricted pod security context demands,
    installs only the operator extra (no torch), and under the trainer image's pins."""
    text = (REPO / "operator" / "Dockerfile").read_text()
    values = yaml.safe_load((REPO / "helm/forgeline/values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    assert f"USER {uid}:{uid}" in text
    assert "'.[operator]'" in text and "torch" not in text.split("FROM", 1)[1]
    assert "-c /tmp/constraints.txt" in text
    chart = (REPO / "helm/forgeline/Chart.yaml").read_text()
    assert f'appVersion: "{yaml.safe_load(chart)["appVersion"]}"' in chart
