"""MLflow: the registry users already have. Rank 0 logs the job to the tracking server its config
names (`run.mlflow_tracking_uri`: spec.mlflow's, else the operator's default):

    parameters      the spec's training facts (method, model, steps, batch, learning rate, seed...)
    metrics         every progress record's loss, learning rate, tokens/s and MFU at its step; each
                    eval's metrics (the baseline as `before/<metric>`)
    at the end      the output's location and lineage digest as tags; metrics.json, lineage.json and
                    the model card as artifacts; and — when spec.mlflow.registeredModel is set and
                    spec.promotion promoted the output (or the job has no gate) — a new version of
                    that registered model, tagged with the job, namespace, output and lineage
                    digest, with the alias (`promoted`) moved to it. Its source: an object-store
                    output (s3://, gs://...) where it is; a local or volume output (which the
                    registry's users cannot reach) uploaded into the run's artifacts, `model/`

One MLflow run per job: a resubmitted attempt continues its job's run (found by the
`forgeline.run` tag). Credentials come from the environment (MLFLOW_TRACKING_TOKEN, or
MLFLOW_TRACKING_USERNAME/PASSWORD, from spec.credentials' Secret). A server that does not answer,
or refuses, is said in one `event` record and MLflow is off for the rest of the attempt: the job
never fails for it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUN_TAG = "forgeline.run"
_TIMEOUT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_STEP_METRICS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu")


class Tracker:
    """One job's MLflow run on rank 0 (every call a no-op once MLflow is off or failed)."""

    def __init__(self, cfg: Any, warn: Any) -> None:
        self.cfg = cfg
        self.uri: str | None = cfg.run.mlflow_tracking_uri
        self.warn = warn  # (message, **fields) -> None: the reporter's event
        self.client: Any = None
        self.run_id: str | None = None
        self.failed = False

    @property
    def on(self) -> bool:
        return bool(self.uri) and not self.failed

    def _guard(self, what: str, call: Any) -> Any:
        if not self.on:
            return None
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - MLflow is never a reason for a job to fail
            self.failed = True
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.warn(
                f"MLflow at {self.uri} could not be used ({what}): {message}; the job goes on without it",
                tracking_uri=self.uri,
            )
            return None

    def start(self) -> None:
        """The job's run (created, or the one an earlier attempt left), with its parameters."""
        self._guard("starting the run", self._start)

    def _start(self) -> None:
        for key, value in _TIMEOUT_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        cfg = self.cfg
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        settings = cfg.spec.mlflow
        name = (settings.experiment if settings is not None else None) or cfg.namespace
        experiment = self.client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{cfg.run.run_name}'")
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {
                RUN_TAG: cfg.run.run_name,
                "forgeline.job": cfg.name,
                "forgeline.namespace": cfg.namespace,
                "forgeline.kind": cfg.kind,
            }
            run = self.client.create_run(exp_id, run_name=cfg.name, tags=tags)
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=_params(cfg))
        self.client.set_tag(self.run_id, "forgeline.attempt", str(cfg.run.attempt))

    def step(self, step: int, record: Mapping[str, Any]) -> None:
        self._guard("logging metrics", lambda: self._metrics(step, {k: record.get(k) for k in _STEP_METRICS}))

    def evaluation(self, step: int, values: Mapping[str, Any]) -> None:
        prefix = "before/" if step == 0 else ""
        self._guard(
            "logging an eval", lambda: self._metrics(step, {f"{prefix}{k}": v for k, v in values.items()})
        )

    def _metrics(self, step: int, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(v), now, step)
            for key, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if metrics and self.run_id:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, out_dir: Path, summary: Mapping[str, Any], lineage_digest: str, output: str) -> None:
        """The end of a successful run: tags, artifacts, the registered version, FINISHED."""
        self._guard("logging the output", lambda: self._finish(out_dir, summary, lineage_digest, output))

    def _finish(self, out_dir: Path, summary: Mapping[str, Any], lineage_digest: str, output: str) -> None:
        if not self.run_id:
            return
        client, run_id = self.client, self.run_id
        client.set_tag(run_id, "forgeline.output", output)
        client.set_tag(run_id, "forgeline.lineage_digest", lineage_digest)
        verdict = summary.get("promotion")
        if verdict is not None:
            client.set_tag(run_id, "forgeline.promoted", str(bool(verdict.get("promoted"))).lower())
        for name in ("metrics.json", "lineage.json", "README.md"):
            if (out_dir / name).is_file():
                client.log_artifact(run_id, str(out_dir / name), artifact_path="forgeline")
        settings = self.cfg.spec.mlflow
        model = settings.registered_model if settings is not None else None
        if model and (verdict is None or verdict.get("promoted")):
            if output.startswith(("s3://", "gs://", "gcs://", "abfss://", "wasbs://")):
                source = output  # an object store the registry's users read: registered where it is
            else:  # a local path or a cluster volume: uploaded into the run's artifacts
                client.log_artifacts(run_id, str(out_dir), artifact_path="model")
                source = f"runs:/{run_id}/model"
            self._register(model, settings.alias, source, lineage_digest, output)
        elif model:
            self.warn(
                f"not registered as a version of {model}: spec.promotion did not promote it", model=model
            )
        client.set_terminated(run_id, status="FINISHED")

    def _register(self, model: str, alias: str, source: str, lineage_digest: str, output: str) -> None:
        from mlflow.exceptions import MlflowException

        client, cfg = self.client, self.cfg
        try:
            client.get_registered_model(model)
        except MlflowException:
            client.create_registered_model(model, tags={"forgeline.kind": cfg.kind})
        tags = {
            "forgeline.job": cfg.name,
            "forgeline.namespace": cfg.namespace,
            "forgeline.lineage_digest": lineage_digest,
            "forgeline.output": output,
        }
        version = client.create_model_version(model, source=source, run_id=self.run_id, tags=tags)
        client.set_registered_model_alias(model, alias, version.version)
        self.warn(  # not a warning: the event says where the model went
            f"registered as {model} version {version.version} (alias {alias})",
            model=model,
            version=version.version,
            level="info",
        )

    def failed_attempt(self) -> None:
        """The attempt ended in an error: the run says FAILED (a resubmission sets it running again)."""
        if self.run_id:
            self._guard("ending the run", lambda: self.client.set_terminated(self.run_id, status="FAILED"))


def _params(cfg: Any) -> list[Any]:
    """The spec's training facts as MLflow params (flattened, at most 500 characters each)."""
    from mlflow.entities import Param

    spec = cfg.spec.to_dict()
    keep = {
        k: spec.get(k) for k in ("method", "objective", "training", "lora", "model", "resources", "promotion")
    }
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif value is not None and not isinstance(value, list):
            flat[prefix] = value

    walk("", keep)
    flat["kind"] = cfg.kind
    flat["output"] = cfg.paths.output
    if cfg.paths.base_model:
        flat["base_model"] = cfg.paths.base_model
    return [Param(k, str(v)[:500]) for k, v in sorted(flat.items())][:100]
