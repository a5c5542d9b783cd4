"""The test cluster's node anchor: a node's processes may start only once its mount namespace is
made (root: unshare)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from forgeline_operator.dev.cluster.node import anchor_ready


@contextmanager
def _process(*argv: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _ready_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if anchor_ready(pid):
            return True
        time.sleep(0.05)
    return False


def test_an_anchor_is_ready_only_once_it_is_sleep_in_a_mount_namespace_of_its_own() -> None:
    """The anchor's shell and the unshare before it name "sleep" in their command lines too: a
    check that matched the word let containerd start in this machine's mount namespace (CI, twice
    in one run), where the kubelet and ctr never found its socket."""
    setup = "mount -t tmpfs forgeline-test /mnt && sleep 1 && exec sleep infinity"
    with _process("unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", setup) as p:
        time.sleep(0.3)
        assert not anchor_ready(p.pid), "ready while its shell was still making its mounts"
        assert _ready_within(p.pid, 10), "never ready once it became sleep in its own namespace"


def test_a_sleep_in_this_mount_namespace_is_not_an_anchor() -> None:
    with _process("sleep", "infinity") as p:
        assert not _ready_within(p.pid, 1)
    with _process("/bin/sh", "-c", "sleep 30; exec sleep infinity") as p:
        assert not _ready_within(p.pid, 1)
