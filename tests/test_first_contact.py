"""First contact: a job that cannot succeed for a reason knowable before training says so in one
line (typed reason, what failed, the fix), in seconds, with no traceback and no raw Ray log.

`forgeline run` on copies of the shipped examples, each with one thing wrong, as a new user meets
them: checked on this machine before an embedded Ray head is started (forgeline_operator.api
.inputs). The operator path runs the same cases (tests/test_operator.py) and must say the same
line in status.message. The hub is never reached: the suite's HF_ENDPOINT is a closed loopback
port (tests/conftest.py), as on a machine without hub access."""

from __future__ import annotations

import http.server
import os
import re
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from forgeline_operator.api import inputs
from forgeline_operator.api.errors import parse_job
from forgeline_operator.api.jobconfig import build_job_config
from forgeline_operator.cli.runlocal import readable_log

from .conftest import EXAMPLES, REPO

FIRST_CONTACT_SECONDS = 5.0


def _lora(base: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["spec"]["baseModel"] = base

    return mutate


def _missing_data(doc: dict[str, Any]) -> None:
    doc["spec"]["data"]["sources"] = [{"uri": "examples/data/missing-corpus.jsonl"}]


# name → (example, what is wrong, reason, the line's start after the reason, what the line says)
CASES: dict[str, tuple[str, Callable[[dict[str, Any]], None], str, str, str]] = {
    "data-missing": (
        "pretrain-tiny-llama",
        _missing_data,
        "DataError",
        "spec.data.sources[0].uri: no data at ",
        "missing-corpus.jsonl — fix: give a path that exists where the job runs",
    ),
    "hub-unreachable": (
        "finetune-lora-tiny",
        _lora({"hubId": "forgeline-tests/unreachable"}),
        "ModelUnavailable",
        "spec.baseModel: cannot reach http://127.0.0.1:9 within 3s for hub id forgeline-tests/unreachable",
        "fix: set HF_ENDPOINT to a reachable hub mirror",
    ),
    "model-missing": (
        "finetune-lora-tiny",
        _lora({"path": "runs/no-such-model"}),
        "ModelUnavailable",
        "spec.baseModel: model directory ",
        "runs/no-such-model does not exist — fix: point spec.baseModel at a save_pretrained directory",
    ),
    "not-a-model": (
        "finetune-lora-tiny",
        _lora({"path": "examples/data"}),
        "ModelUnavailable",
        "spec.baseModel: ",
        "examples/data has no config.json: it is not a saved model",
    ),
}


def manifest(case: str, name: str | None = None) -> dict[str, Any]:
    example, mutate, *_ = CASES[case]
    doc = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
    doc["metadata"]["name"] = name or case
    doc["spec"]["output"]["uri"] = f"runs/first-contact-{case}"
    mutate(doc)
    return doc


def expected(case: str) -> tuple[str, str]:
    """What the one line starts with (reason and field) and what else it says."""
    _, _, reason, start, says = CASES[case]
    return f"{reason}: {start}", says


def forgeline_run(
    path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    exe = str(Path(sys.executable).parent / "forgeline")
    started = time.monotonic()
    proc = subprocess.run(
        [exe, "run", str(path), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "80", **(env or {})},
        timeout=300,
    )
    return proc, time.monotonic() - started


def one_line(out: str) -> str:
    """The failure's line as `forgeline run` prints it after `✗ Kind/name` (and `failed:`)."""
    (line,) = [ln for ln in out.splitlines() if "✗" in ln]
    match = re.match(r"✗ \S+/\S+ (?:failed: )?(.*)$", line)
    assert match, line
    return match.group(1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forgeline_run_says_what_is_wrong_in_one_line_within_seconds(case: str, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest(case)))
    proc, took = forgeline_run(path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    start, says = expected(case)
    line = one_line(out)
    assert start in line and says in line, line
    assert line == line.strip() and "\n" not in line
    assert "Traceback" not in out and "embedded Ray head" not in out and "FORGELINE_PROGRESS" not in out, out
    assert took < FIRST_CONTACT_SECONDS, f"{took:.1f}s: {out}"


def test_hub_offline_mode_is_honoured(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 and the id not in the cache: said at once, nothing sent anywhere."""
    doc = manifest("hub-unreachable")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc, took = forgeline_run(path, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    line = one_line(proc.stdout)
    assert (
        proc.returncode == 1
        and "ModelUnavailable: spec.baseModel: hub id forgeline-tests/unreachable" in line
    )
    assert "is not in this machine's Hugging Face cache and HF_HUB_OFFLINE is set" in line, line
    assert took < FIRST_CONTACT_SECONDS


@pytest.fixture
def hub_that_wants_a_token() -> Iterator[str]:
    """A loopback hub answering every file as the Hugging Face hub answers a gated model."""

    class Gated(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to this model is restricted.")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args: Any) -> None:
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), Gated) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()


def test_a_gated_hub_model_without_a_token_names_hf_token(
    tmp_path: Path, hub_that_wants_a_token: str
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest("hub-unreachable")))
    env = {"HF_ENDPOINT": hub_that_wants_a_token, "HF_HOME": str(tmp_path / "hf")}
    proc, took = forgeline_run(path, env={**env, "HF_TOKEN": ""})
    line = one_line(proc.stdout)
    assert "hub id forgeline-tests/unreachable is gated and HF_TOKEN is not set" in line, line
    assert "fix: export HF_TOKEN with access to forgeline-tests/unreachable" in line
    assert took < FIRST_CONTACT_SECONDS


def test_an_output_location_that_cannot_be_made_is_a_storage_error(tmp_path: Path) -> None:
    """The output's parent is a file (root may write anywhere: a file is what stops it too)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    doc = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())
    doc["spec"]["output"]["uri"] = str(blocker / "model")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc, took = forgeline_run(path)
    line = one_line(proc.stdout)
    assert line.startswith("StorageError: spec.output.uri: ") and f"{blocker} is not a directory" in line, (
        line
    )
    assert "fix: point spec.output.uri at a location the trainer can write" in line
    assert took < FIRST_CONTACT_SECONDS


def test_a_base_model_without_its_tokenizer_is_named(tmp_path: Path) -> None:
    """A fine-tune loads its tokenizer from the base model's directory: config.json alone is not
    enough."""
    base = tmp_path / "weights-only"
    base.mkdir()
    (base / "config.json").write_text("{}")
    doc = manifest("model-missing")
    doc["spec"]["baseModel"] = {"path": str(base)}
    config = build_job_config(parse_job(doc), work_dir=str(REPO))
    (problem,) = inputs.check(config)
    assert problem.line().startswith(f"ModelUnavailable: spec.baseModel: {base} has no tokenizer.json or ")
    assert "not a saved tokenizer (the fine-tune loads its tokenizer from spec.baseModel)" in problem.line()


def test_a_pipelines_later_stages_are_not_held_to_what_earlier_ones_write() -> None:
    """The shipped pipeline's SFT and DPO stages read the stage before's output: not there yet,
    and not a problem."""
    docs = list(yaml.safe_load_all((EXAMPLES / "pipeline-pretrain-sft-dpo.yaml").read_text()))
    from forgeline_operator.cli.runlocal import check_inputs

    jobs = [parse_job(d) for d in docs if d]
    assert check_inputs(jobs, None, str(REPO)) == []


def test_the_same_check_runs_where_the_job_reads_its_inputs() -> None:
    """api.inputs resolves pvc:// under FORGELINE_PVC_ROOT, as the Ray pods mount claims."""
    doc = manifest("data-missing")
    doc["spec"]["data"]["sources"] = [{"uri": "pvc://work/corpus.jsonl"}]
    doc["spec"]["evaluation"].pop("sources", None)
    config = build_job_config(parse_job(doc), work_dir="/nonexistent")
    problems = inputs.check(config, env={"FORGELINE_PVC_ROOT": str(EXAMPLES)})
    assert [p.field for p in problems] == ["spec.data.sources[0].uri"]
    assert f"no data at {EXAMPLES}/work/corpus.jsonl" in problems[0].message


def test_a_failure_found_while_training_is_one_line_with_the_log_kept(tmp_path: Path) -> None:
    """Data the filters empty is found by the trainer (it must read the data): the same one-line
    form, then where the full log is; no traceback, no Ray colour codes, no progress records."""
    doc = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())
    doc["metadata"]["name"] = "filtered-out"
    doc["spec"]["output"]["uri"] = str(tmp_path / "out")
    doc["spec"]["data"]["filters"] = {"minChars": 10**7}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc, _ = forgeline_run(path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    line = one_line(out)
    assert line.startswith("DataError: ") and "filtered out" in line and "fix:" in line, out
    assert "Traceback" not in out and "\x1b[" not in out and "FORGELINE_PROGRESS" not in out, out
    (kept,) = re.findall(r"full log: (\S+\.log)", out)
    assert "FORGELINE_PROGRESS" in Path(kept).read_text()  # the whole log, kept


def test_a_readable_log_drops_colour_codes_progress_records_and_ray_chatter() -> None:
    log = "\n".join(
        [
            "\x1b[36m(TrainController pid=812)\x1b[0m 2026-12-03 15:40:01,123\tINFO wg.py:1 -- started",
            'FORGELINE_PROGRESS {"type": "progress", "step": 3}',
            "2026-12-03 15:40:02,000\tINFO job_manager.py:9 -- Runtime env is setting up.",
            "",
            "\x1b[31mValueError: the tokenizer has no pad token\x1b[0m",
        ]
    )
    assert readable_log(log) == ["ValueError: the tokenizer has no pad token"]


@pytest.mark.parametrize("width", [60, 80, 120, 200])
def test_the_demos_live_table_fits_the_terminal_without_wrapping_a_cell(width: int) -> None:
    """`make demo`'s table at any width (80 when output is not a terminal): one line per job,
    no line wider than the terminal; fewer columns where fewer fit, as `kubectl get` does."""
    import io

    from rich.console import Console

    from forgeline_operator.dev.demo import JOBS, _table

    status = {
        "phase": "Running",
        "message": "Ray job forgeline-pipe-pretrain-3f9a2c1d-0 submitted to the RayCluster pipe-pretrain-tj",
        "progress": {
            "summary": "1,200/2,000",
            "display": {"loss": "2.91", "eval": "ppl 17.3", "tokensPerSecond": "46.2k", "mfu": "31%"},
        },
    }
    objs = {name: {"status": status} for _, name in JOBS}
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    console.print(_table(objs, console.width))
    lines = out.getvalue().splitlines()
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    rows = [line for line in lines if "pipe-" in line]
    assert len(rows) == len(JOBS), "\n".join(lines)  # no cell wrapped onto a second line
    headings = " ".join(lines[:4])
    assert all(h in headings for h in ("job", "phase", "progress"))
    assert ("MFU" in headings) == (width >= 120), "\n".join(lines)
