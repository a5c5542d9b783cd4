"""FORGELINE_STORAGE_PREFIXES: crafted paths never get a job's writes outside them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeline_operator.controller.storagepolicy import normalize, outside, within

PREFIXES = ["s3://team-a/", "/mnt/pvc/team-a", "pvc://team-a-claim/runs"]


@pytest.mark.parametrize(
    "uri",
    [
        "s3://team-a/runs/../../other/x",
        "s3://team-a/../team-b/x",
        "s3://team-a-evil/x",  # a look-alike name: prefixes end at a path boundary
        "/mnt/pvc/team-a/../team-b/ckpt",
        "/mnt/pvc/team-a-old/ckpt",
        "/mnt/pvc//team-a/../../../etc/cron.d/x",
        "file:///mnt/pvc/team-a/../../../root/.ssh",
        "runs/../../escape",  # relative: under the work directory, which is not allowed
        "pvc://team-a-claim/runs/../../other-claim/x",
        "gs://team-a/x",  # another scheme
        "/mnt/pvc/team-b/$(rm -rf ~)/x",
        "/mnt/pvc/téam-a/x",  # unicode look-alike
    ],
)
def test_crafted_locations_are_refused(uri: str) -> None:
    assert outside(uri, PREFIXES, work_dir="/srv/forgeline") is not None


@pytest.mark.parametrize(
    "uri",
    [
        "s3://team-a/runs/llama/../llama-2/ckpt",
        "s3://team-a//runs/./x",
        "/mnt/pvc/team-a/runs/x/../y",
        "file:///mnt/pvc/team-a/out",
        "pvc://team-a-claim/runs/exp-1",
        "/mnt/pvc/team-a/$(echo hi)/;rm -rf",  # odd, but a file name inside the prefix
    ],
)
def test_locations_inside_are_allowed(uri: str) -> None:
    assert outside(uri, PREFIXES) is None


def test_no_prefixes_means_no_restriction_and_normalisation_is_lexical() -> None:
    assert outside("../../anywhere", []) is None
    assert normalize("s3://b/../../x") == "s3://x"
    assert normalize("runs/../out", "/work") == "/work/out"
    assert within("/work/out", "/work/") and not within("/workshop", "/work")


_SEGMENTS = st.sampled_from(["..", ".", "", "a", "team-a", "b", "тест", "$(id)", "%2e%2e", "..."])


@settings(max_examples=500, derandomize=True, deadline=None)
@given(st.lists(_SEGMENTS, max_size=8))
def test_an_s3_key_is_inside_exactly_when_its_resolution_stays_in_the_bucket(parts: list[str]) -> None:
    uri = "s3://team-a/" + "/".join(parts)
    stack = ["team-a"]
    for part in parts:  # the reference: resolve like a filesystem that cannot climb above s3://
        if part == "..":
            stack = stack[:-1]
        elif part not in (".", ""):
            stack.append(part)
    assert within(uri, "s3://team-a/") == (bool(stack) and stack[0] == "team-a")
