"""The Ray job log archive's rules (where, how much) and a local write/read round trip."""

from __future__ import annotations

from pathlib import Path

from forgeline_operator.controller import logarchive

JOB = ("team-a", "TrainingJob", "llama")


def test_the_archive_root_wins_and_names_the_job() -> None:
    uri = logarchive.location(2, JOB, "s3://ckpt/llama", "s3://logs/forgeline", None, local_paths=False)
    assert uri == "s3://logs/forgeline/team-a/trainingjob/llama/attempt-2.log"


def test_next_to_the_checkpoints_where_the_operator_can_reach_them(tmp_path: Path) -> None:
    assert logarchive.location(0, JOB, "s3://b/ckpt/", None, None, False) == "s3://b/ckpt/logs/attempt-0.log"
    assert logarchive.location(1, JOB, "runs/x/ckpt", None, str(tmp_path), True) == str(
        tmp_path / "runs/x/ckpt/logs/attempt-1.log"
    )
    on_disk = logarchive.location(0, JOB, "file:///data/ckpt", None, None, True)
    assert on_disk == "/data/ckpt/logs/attempt-0.log"
    # a KubeRay cluster's PVC or pod-local path is not the operator's to write
    assert logarchive.location(0, JOB, "pvc://claim/ckpt", None, None, True) is None
    assert logarchive.location(0, JOB, "/mnt/ckpt", None, None, local_paths=False) is None
    assert logarchive.location(0, JOB, None, None, None, True) is None


def test_the_archive_keeps_the_end_within_its_bound() -> None:
    text = "".join(f"line {i}\n" for i in range(10_000))
    kept = logarchive.tail(text, 1000)
    body = kept.split("\n", 1)[1]
    assert kept.startswith("[... ") and "earlier bytes not archived" in kept
    assert len(body.encode()) <= 1000 and body.endswith("line 9999\n")
    assert body.startswith("line ")  # cut at a line start
    assert logarchive.tail("short\n", 1000) == "short\n"


def test_rewrite_and_read_back(tmp_path: Path) -> None:
    uri = str(tmp_path / "a/b/attempt-0.log")
    logarchive.write(uri, "first\n", 1024)
    logarchive.write(uri, "first\nsecond\n", 1024)  # rewritten, never appended twice
    assert logarchive.read(uri) == "first\nsecond\n"
    assert not Path(f"{uri}.tmp").exists()
