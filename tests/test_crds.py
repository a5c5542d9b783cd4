"""The committed CRDs match the models, install on a real apiserver, default and explain."""

from __future__ import annotations

import json

import pytest

from forgeline_operator.api import FineTuneJob, TrainingJob, parse_job
from forgeline_operator.api.crd import render_crds
from forgeline_operator.cli.main import main as cli

from .conftest import CRDS, EXAMPLES, Cluster, load_yaml_documents


def test_committed_crds_match_the_models() -> None:
    rendered = render_crds()
    assert sorted(p.name for p in CRDS.glob("*.yaml")) == sorted(rendered)
    for name, text in rendered.items():
        assert (CRDS / name).read_text() == text, (
            f"crds/{name} is out of date with the models: run `forgeline crds` (make crds)"
        )


def test_crds_check_command_detects_drift(tmp_path, capsys) -> None:
    assert cli(["crds", "--dir", str(tmp_path)]) == 0
    assert cli(["crds", "--dir", str(tmp_path), "--check"]) == 0
    target = tmp_path / "forgeline.dev_trainingjobs.yaml"
    target.write_text(target.read_text().replace("maxLength: 43", "maxLength: 44"))
    assert cli(["crds", "--dir", str(tmp_path), "--check"]) == 1
    assert "forgeline.dev_trainingjobs.yaml" in capsys.readouterr().err


@pytest.mark.cluster
@pytest.mark.parametrize("name", ["trainingjobs.forgeline.dev", "finetunejobs.forgeline.dev"])
def test_crd_is_structural_and_established(cluster: Cluster, name: str) -> None:
    crd = json.loads(cluster.kubectl("get", "crd", name, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions.get("Established") == "True"
    assert conditions.get("NamesAccepted") == "True"
    assert "NonStructuralSchema" not in conditions
    assert crd["status"]["acceptedNames"]["shortNames"] in (["tj"], ["ftj"])


@pytest.mark.cluster
def test_kubectl_explain_shows_field_docs(cluster: Cluster) -> None:
    spec = cluster.kubectl("explain", "trainingjob.spec").stdout
    for field in (
        "model",
        "data",
        "training",
        "deepspeed",
        "resources",
        "checkpointing",
        "output",
        "suspend",
        "ttlSecondsAfterFinished",
        "backoffLimit",
        "budget",
    ):
        assert f"{field}\t" in spec or f"{field} " in spec, f"{field} missing from explain:\n{spec}"
    zero = cluster.kubectl("explain", "trainingjob.spec.deepspeed.zeroStage").stdout
    assert "ZeRO stage" in zero
    lora = cluster.kubectl("explain", "finetunejob.spec.lora.r").stdout
    assert "Adapter rank" in lora


@pytest.mark.cluster
def test_apiserver_defaults_match_pydantic_defaults(cluster: Cluster, namespace: str) -> None:
    """A minimal manifest stored by the apiserver (which applies the CRD defaults) parses to the
    same spec as pydantic's own defaults: the two defaulting paths agree."""
    doc = {
        "apiVersion": "forgeline.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "defaults", "namespace": namespace},
        "spec": {
            "model": {"architecture": "llama"},
            "data": {"sources": [{"uri": "s3://b/c"}]},
            "training": {"maxSteps": 10},
            "output": {"uri": "s3://b/out"},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
    stored = json.loads(cluster.kubectl("get", "tj", "defaults", "-n", namespace, "-o", "json").stdout)
    # The apiserver filled in nested defaults...
    assert stored["spec"]["resources"]["workers"] == 1
    assert stored["spec"]["training"]["learningRate"] == pytest.approx(3e-4)
    assert stored["spec"]["checkpointing"]["keep"] == 3
    assert stored["spec"]["data"]["filters"]["dedup"] == "exact"
    # ...and they are exactly pydantic's.
    assert parse_job(stored).spec == parse_job(doc).spec


@pytest.mark.cluster
def test_printer_columns_show_status(cluster: Cluster, namespace: str) -> None:
    docs = load_yaml_documents(EXAMPLES / "pipeline-pretrain-sft-dpo.yaml")
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
        cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
    status = {
        "status": {
            "phase": "Running",
            "progress": {
                "step": 30,
                "totalSteps": 60,
                "summary": "30/60",
                "loss": 2.512,
                "tokensPerSecond": 46150.2,
                "mfu": 0.303,
                "display": {"loss": "2.51", "tokensPerSecond": "46.2k", "mfu": "30%"},
            },
        }
    }
    cluster.kubectl(
        "patch",
        "tj",
        "pipe-pretrain",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
        check=False,
    )
    patched = cluster.kubectl("get", "tj", "pipe-pretrain", "-n", namespace, "-o", "json")
    if json.loads(patched.stdout).get("status", {}).get("phase") != "Running":
        # kubectl older than the server may lack --subresource: use the API directly.
        from kubernetes import client

        api = client.CustomObjectsApi(cluster.api_client())
        api.patch_namespaced_custom_object_status(
            "forgeline.dev", "v1alpha1", namespace, "trainingjobs", "pipe-pretrain", status
        )
    table = cluster.kubectl("get", "tj,ftj", "-n", namespace).stdout
    header = table.splitlines()[0]
    for column in ("NAME", "PHASE", "MODEL", "PROGRESS", "LOSS", "AGE"):
        assert column in header, table
    row = next(line for line in table.splitlines() if "pipe-pretrain" in line)
    assert "Running" in row and "30/60" in row and " 2.51 " in row and "llama" in row
    assert any("METHOD" in line for line in table.splitlines()), table
    assert "lora" in table and "dpo" in table
    wide = cluster.kubectl("get", "forgeline", "-n", namespace, "-o", "wide").stdout
    assert "TOKENS/S" in wide and "MFU" in wide and "RESTARTS" in wide
    row = next(line for line in wide.splitlines() if "pipe-pretrain" in line)
    assert " 46.2k " in row and " 30% " in row, wide
    assert "pipe-sft" in wide and "pipe-pretrain" in wide


@pytest.mark.cluster
def test_status_rejects_unknown_phase(cluster: Cluster, namespace: str) -> None:
    doc = load_yaml_documents(EXAMPLES / "pretrain-tiny-llama.yaml")[0]
    doc["metadata"]["namespace"] = namespace
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(cluster.api_client())
    with pytest.raises(ApiException) as info:
        api.patch_namespaced_custom_object_status(
            "forgeline.dev",
            "v1alpha1",
            namespace,
            "trainingjobs",
            doc["metadata"]["name"],
            {"status": {"phase": "Exploded"}},
        )
    assert info.value.status == 422 and "status.phase" in info.value.body


def test_job_classes_name_their_crds() -> None:
    assert TrainingJob.PLURAL == "trainingjobs" and FineTuneJob.PLURAL == "finetunejobs"
