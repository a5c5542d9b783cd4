"""`forgeline validate` and `forgeline crds` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import EXAMPLES, REPO


def _forgeline(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("forgeline") or str(Path(sys.executable).parent / "forgeline")
    return subprocess.run([exe, *args], capture_output=True, text=True, input=stdin, cwd=REPO)


def test_console_script_validates_examples_directory() -> None:
    proc = _forgeline("validate", "examples", "examples/production")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "✓ examples/pretrain-tiny-llama.yaml: TrainingJob/tiny-llama: valid" in proc.stdout


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("apiVersion: forgeline.dev/v1alpha1\nkind: TrainingJob\nspec:\n  model: [\n")
    proc = _forgeline("validate", str(bad))
    assert proc.returncode == 1
    assert "not valid YAML at line" in proc.stdout


def test_other_kubernetes_objects_are_skipped_not_failed(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n"
        + (EXAMPLES / "pretrain-tiny-llama.yaml").read_text()
    )
    proc = _forgeline("validate", str(mixed))
    assert proc.returncode == 0, proc.stdout
    assert "skipped, not a Forgeline job (v1 ConfigMap)" in proc.stdout
    assert "1 valid, 0 invalid, 1 skipped" in proc.stdout


def test_stdin_and_json_output() -> None:
    text = (REPO / "tests/bad_manifests/ftj-lora-rank-zero.yaml").read_text()
    proc = _forgeline("validate", "-o", "json", "-", stdin=text)
    assert proc.returncode == 1
    (result,) = json.loads(proc.stdout)
    assert result["source"] == "<stdin>" and not result["ok"]
    assert result["errors"][0]["path"] == "spec.lora.r"
    assert result["errors"][0]["fix"] == "use a value >= 1 and <= 1024"


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    proc = _forgeline("validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 1 and "cannot read" in proc.stdout


def test_multiple_files_one_bad_fails_the_run() -> None:
    proc = _forgeline(
        "validate", "examples/pretrain-tiny-llama.yaml", "tests/bad_manifests/tj-lr-negative.yaml"
    )
    assert proc.returncode == 1
    assert "1 valid, 1 invalid" in proc.stdout
    assert "spec.training.learningRate" in proc.stdout


def test_import_layers_hold() -> None:
    """The operator never imports torch/ray.train/deepspeed; the trainer never imports kopf; the
    API models import no Kubernetes or Ray (import-linter contracts in pyproject.toml)."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run([exe], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_operator_modules_load_no_training_stack() -> None:
    """Importing every operator module pulls in neither torch nor ray.train (what import-linter
    cannot express for a subpackage of an external package)."""
    import pkgutil

    import forgeline_operator

    modules = [m.name for m in pkgutil.walk_packages(forgeline_operator.__path__, "forgeline_operator.")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed') "
        "or m.startswith('ray.train'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_run_against_an_unreachable_ray_says_what_to_fix() -> None:
    proc = _forgeline("run", "--address", "http://127.0.0.1:1", "examples/pretrain-tiny-llama.yaml")
    assert proc.returncode == 1
    out = " ".join(proc.stdout.split())
    assert (
        "cannot use the Ray cluster at http://127.0.0.1:1" in out
        and "fix: pass the Ray Jobs API address" in out
    )
    assert "Traceback" not in proc.stdout + proc.stderr


def test_forgeline_run_says_which_credential_keys_its_shell_lacks(monkeypatch) -> None:
    import yaml as _yaml

    from forgeline_operator.api import parse_job
    from forgeline_operator.cli.runlocal import _credential_notes

    doc = _yaml.safe_load((REPO / "examples/pretrain-tiny-llama.yaml").read_text())
    doc["spec"]["credentials"] = [{"secretName": "hf", "keys": ["HF_TOKEN", "OTHER_KEY"]}]
    monkeypatch.setenv("HF_TOKEN", "x")
    monkeypatch.delenv("OTHER_KEY", raising=False)
    (note,) = _credential_notes([parse_job(doc)], None)
    assert "Secret hf is not read here" in note
    assert "not set here: OTHER_KEY" in note and "HF_TOKEN" not in note.split("not set here")[1]
    (remote,) = _credential_notes([parse_job(doc)], "http://ray:8265")
    assert "the Ray cluster at http://ray:8265" in remote and "not set here" not in remote


def test_forgeline_runs_closing_lines_read_the_recipes_own_baseline() -> None:
    """A DPO run logs two evals at step 0: TRL's own (its names) and then the recipe's baseline,
    where an untrained policy's all-tie preference accuracy is said as a tie. The closing line
    reads the recipe's, as the operator's LogCursor does."""
    from forgeline_operator.cli.runlocal import RunResult, _summary

    records = [
        {"type": "eval", "step": 0, "eval_loss": 0.6931, "rewards_accuracies": 0.0},
        {"type": "eval", "step": 0, "preference_accuracy": 0.5, "preference_ties": 1.0, "eval_loss": 0.6931},
        {"type": "progress", "step": 1, "loss": 0.6931},
        {"type": "eval", "step": 15, "eval_loss": 0.59, "rewards_accuracies": 0.5625},
        {"type": "eval", "step": 15, "preference_accuracy": 0.5625, "eval_loss": 0.59},
        {"type": "done", "final_loss": 0.3964},
    ]
    text = _summary(RunResult("pipe-dpo", "FineTuneJob", "SUCCEEDED", "/out", "sid", records), "/w")
    assert "held-out pref acc tie→56% (before → after training)" in text, text
