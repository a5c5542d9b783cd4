"""Unit tests of the API models: defaults, value types and cross-field rules (no cluster)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from forgeline_operator.api import FineTuneJob, InvalidJobError, TrainingJob, parse_job, parse_spec
from forgeline_operator.api.resources import MAX_JOB_NAME_LENGTH
from forgeline_operator.api.status import PHASES, is_terminal

from .conftest import EXAMPLES, load_yaml_documents

TJ = load_yaml_documents(EXAMPLES / "pretrain-tiny-llama.yaml")[0]
FT = load_yaml_documents(EXAMPLES / "finetune-lora-tiny.yaml")[0]


def _with(base: dict[str, Any], **spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    for key, value in spec.items():
        if value is None:
            doc["spec"].pop(key, None)
        else:
            doc["spec"][key] = value
    return doc


def _errors(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidJobError) as info:
        parse_job(doc)
    return {e.path: f"{e.message} | {e.fix}" for e in info.value.errors}


def test_defaults_a_user_expects() -> None:
    job = parse_job(
        {
            "apiVersion": "forgeline.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "x"},
            "spec": {
                "model": {"architecture": "llama"},
                "data": {"sources": [{"uri": "/d"}]},
                "training": {"maxSteps": 5},
                "output": {"uri": "/o"},
            },
        }
    )
    assert isinstance(job, TrainingJob)
    s = job.spec
    assert s.objective == "causal" and s.deepspeed is None and not s.suspend
    assert s.backoff_limit == 3 and s.ttl_seconds_after_finished is None
    assert s.training.precision == "auto" and s.training.weight_decay == 0.1
    assert s.training.grad_clip == 1.0 and s.training.schedule == "cosine"
    assert s.resources.workers == 1 and s.resources.gpus_per_worker == 0
    assert s.checkpointing.resume == "auto" and s.checkpointing.keep == 3
    assert s.data.packing and s.data.filters.dedup == "exact" and s.data.sequence_length == 2048
    assert job.ray_cluster_name() == "x-tj"


def test_finetune_defaults_differ_where_they_should() -> None:
    job = parse_job(FT)
    assert isinstance(job, FineTuneJob)
    assert job.spec.training.weight_decay == 0.0 and job.spec.training.adam_beta2 == 0.999
    assert job.ray_cluster_name() == "tiny-sft-lora-ftj"


def test_all_cross_field_errors_are_reported_at_once() -> None:
    doc = _with(TJ, objective="masked", deepspeed={"zeroStage": 1, "offloadParams": True})
    doc["spec"]["model"]["numExperts"] = 4
    doc["spec"]["training"]["tokenBudget"] = 1000
    errs = _errors(doc)
    assert {
        "spec.objective",
        "spec.deepspeed.offloadParams",
        "spec.model.numExperts",
        "spec.training",
    } <= set(errs)


def test_unknown_field_suggests_the_close_name() -> None:
    doc = copy.deepcopy(TJ)
    doc["spec"]["resources"]["gpuPerWorker"] = 1
    errs = _errors(doc)
    assert "did you mean 'gpusPerWorker'" in errs["spec.resources.gpuPerWorker"]


def test_missing_required_field_says_what_it_is() -> None:
    errs = _errors(_with(FT, dataset=None))
    assert "spec.dataset" in errs and "needs training records" in errs["spec.dataset"]


@pytest.mark.parametrize(
    "uri,ok",
    [
        ("s3://bucket/prefix", True),
        ("gs://b/p", True),
        ("pvc://claim/dir", True),
        ("file:///abs/path", True),
        ("/abs/path", True),
        ("relative/path", True),
        ("http://host/x", False),
        ("s3://", False),
        ("pvc:///nope", False),
        ("", False),
    ],
)
def test_storage_uris(uri: str, ok: bool) -> None:
    doc = copy.deepcopy(TJ)
    doc["spec"]["output"]["uri"] = uri
    if ok:
        assert parse_job(doc).spec.output.uri == uri
    else:
        assert "spec.output.uri" in _errors(doc)


@pytest.mark.parametrize(
    "value,ok",
    [
        (4, True),
        ("500m", True),
        ("16Gi", True),
        ("1.5", True),
        ("lots", False),
        ("16 GB", False),
        (True, False),
    ],
)
def test_quantities(value: Any, ok: bool) -> None:
    """Kubernetes quantities (memory: any quantity; CPU: also a count of CPUs, see below)."""
    doc = copy.deepcopy(TJ)
    doc["spec"]["resources"]["memory"] = value
    if ok:
        assert parse_job(doc).spec.resources.memory == str(value)
    else:
        assert "spec.resources.memory" in _errors(doc)


@pytest.mark.parametrize(
    "value,ok", [(4, True), ("500m", True), ("1.5", True), ("16Gi", False), ("lots", False), (True, False)]
)
def test_cpu_must_be_a_count_of_cpus(value: Any, ok: bool) -> None:
    doc = copy.deepcopy(TJ)
    doc["spec"]["resources"]["cpu"] = value
    if ok:
        assert parse_job(doc).spec.resources.cpu == str(value)
    else:
        assert "spec.resources.cpu" in _errors(doc)


def test_name_length_leaves_room_for_the_ray_cluster() -> None:
    doc = copy.deepcopy(TJ)
    doc["metadata"]["name"] = "a" * MAX_JOB_NAME_LENGTH
    job = parse_job(doc)
    assert len(job.ray_cluster_name()) <= 47
    doc["metadata"]["name"] = "a" * (MAX_JOB_NAME_LENGTH + 1)
    assert "47-character" in _errors(doc)["metadata.name"]


def test_qlora_rules() -> None:
    assert "spec.quantization" in _errors(_with(FT, method="qlora"))
    errs = _errors(_with(FT, method="qlora", quantization={"bits": 4}))
    assert "allowCpu" in errs["spec.resources.gpusPerWorker"]
    ok = _with(FT, method="qlora", quantization={"bits": 4})
    ok["spec"]["resources"]["gpusPerWorker"] = 1
    ok["spec"]["training"]["globalBatchSize"] = 16
    assert parse_job(ok).spec.quantization.quant_type == "nf4"
    zero3 = _with(ok, deepspeed={"zeroStage": 3})
    assert "spec.deepspeed.zeroStage" in _errors(zero3)
    assert "spec.quantization" in _errors(
        _with(FT, method="full", lora=None, quantization={"bits": 4}, output={"uri": "o"})
    )


def test_method_and_dataset_format_must_fit() -> None:
    assert "preference" in _errors(_with(FT, method="reward-model"))["spec.dataset.format"]
    ok = copy.deepcopy(FT)
    ok["spec"].update(method="reward-model", lora=None, output={"uri": "o"})
    ok["spec"]["dataset"]["format"] = "preference"
    assert parse_job(ok).spec.method == "reward-model"


def test_raw_deepspeed_config_cannot_fight_the_spec() -> None:
    doc = _with(
        TJ, deepspeed={"zeroStage": 2, "config": {"zero_optimization": {"stage": 3}, "gradient_clipping": 5}}
    )
    errs = _errors(doc)
    assert "spec.deepspeed.config.zero_optimization.stage" in errs
    assert "gradClip" in errs["spec.deepspeed.config.gradient_clipping"]
    fine = _with(TJ, deepspeed={"zeroStage": 2, "config": {"zero_optimization": {"overlap_comm": True}}})
    assert parse_job(fine).spec.deepspeed.config["zero_optimization"]["overlap_comm"] is True


def test_global_batch_tokens_must_be_whole_sequences() -> None:
    doc = copy.deepcopy(TJ)
    doc["spec"]["training"].pop("globalBatchSize")
    doc["spec"]["training"]["globalBatchTokens"] = 1000
    assert "multiple of data.sequenceLength" in _errors(doc)["spec.training.globalBatchTokens"]
    doc["spec"]["training"]["globalBatchTokens"] = 64 * 32
    assert parse_job(doc).spec.training.global_batch_tokens == 2048


def test_parse_spec_prefixes_paths_with_spec() -> None:
    spec = copy.deepcopy(TJ["spec"])
    spec["training"]["learningRate"] = 0
    with pytest.raises(InvalidJobError) as info:
        parse_spec("TrainingJob", spec)
    assert [e.path for e in info.value.errors] == ["spec.training.learningRate"]


def test_not_a_mapping_and_unknown_kind() -> None:
    with pytest.raises(InvalidJobError, match="expected a mapping"):
        parse_job(["not", "a", "job"])
    with pytest.raises(InvalidJobError) as info:
        parse_job({"apiVersion": "forgeline.dev/v1alpha1", "kind": "PretrainJob"})
    assert info.value.errors[0].path == "kind"


def test_status_phases_and_terminal_helper() -> None:
    assert set(PHASES) == {
        "Pending",
        "Waiting",
        "Provisioning",
        "Running",
        "Succeeded",
        "Failed",
        "Suspended",
    }
    assert is_terminal("Succeeded") and is_terminal("Failed")
    assert not any(is_terminal(p) for p in ("Pending", "Running", "Suspended", None))


def test_cpu_quantities_parse_strictly() -> None:
    from forgeline_operator.api.quantities import cpu_cores

    assert cpu_cores("4") == 4.0 and cpu_cores("1.5") == 1.5 and cpu_cores("500m") == 0.5
    assert cpu_cores(2) == 2.0 and cpu_cores(" 250m ") == 0.25
    for bad in ("2Gi", "lots", "", "0", "-1", "1.5m5", True):
        with pytest.raises(ValueError, match=r"spec.resources.head.cpu: .*; write CPUs as e.g. 4"):
            cpu_cores(bad, "spec.resources.head.cpu")


def _merge_doc(**merge: Any) -> dict[str, Any]:
    adapters = [{"fromJob": {"kind": "FineTuneJob", "name": n}, "weight": 0.5} for n in ("sft-a", "sft-b")]
    doc = _with(FT, method="merge", lora=None, training=None, dataset=None)
    doc["spec"]["resources"]["workers"] = 1
    doc["spec"]["output"] = {"uri": "runs/mix"}
    doc["spec"]["merge"] = {"adapters": adapters, **merge}
    return doc


def test_merge_trains_nothing_and_waits_for_its_adapters() -> None:
    job = parse_job(_merge_doc(combination="ties", density=0.3))
    assert job.spec.dataset is None and job.spec.training.max_steps is None  # no steps-or-epochs rule
    assert [r.name for r in job.upstream_refs()] == ["sft-a", "sft-b"]
    assert job.spec.merge.labels() == ["sft-a", "sft-b"]
    from forgeline_operator.api.jobconfig import build_job_config

    with pytest.raises(ValueError, match="must be resolved first"):
        build_job_config(job)
    cfg = build_job_config(job, adapters=["/o/a", "/o/b"])
    assert cfg.paths.adapters == ["/o/a", "/o/b"] and cfg.paths.base_model == "runs/tiny-llama"


def test_merge_rules_name_the_field_and_the_fix() -> None:
    no_merge = _merge_doc()
    del no_merge["spec"]["merge"]
    assert "add `merge: {adapters:" in _errors(no_merge)["spec.merge"]
    stray = copy.deepcopy(FT)
    stray["spec"]["merge"] = _merge_doc()["spec"]["merge"]
    assert "use method: merge" in _errors(stray)["spec.merge"]
    errs = _errors(
        _with(_merge_doc(), lora={"r": 8}, quantization={"bits": 4}, promptTuning={"numVirtualTokens": 4})
    )
    assert {"spec.lora", "spec.quantization", "spec.promptTuning"} <= set(errs)
    assert "give at least 2" in _errors(_merge_doc(adapters=[{"path": "a"}]))["spec.merge.adapters"]
    assert "remove density" in _errors(_merge_doc(combination="linear", density=0.5))["spec.merge.density"]
    assert "majoritySignMethod" in str(_errors(_merge_doc(combination="cat", majoritySignMethod="frequency")))
    assert "spec.merge.adapters[1].name" in _errors(
        _merge_doc(adapters=[{"path": "a"}, {"path": "b", "name": "adapter-0"}])
    )
    assert "exactly one of" in _errors(_merge_doc(adapters=[{"path": "a"}, {}]))["spec.merge.adapters[1]"]
    two = _merge_doc()
    two["spec"]["resources"]["workers"] = 2
    assert "workers: 1" in _errors(two)["spec.resources"]
    with_save = _merge_doc()
    with_save["spec"]["output"]["save"] = "merged"
    assert "mergeIntoBase" in _errors(with_save)["spec.output.save"]
    assert "needs training records" in _errors(_with(FT, dataset=None))["spec.dataset"]
