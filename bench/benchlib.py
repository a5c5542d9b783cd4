"""What every bench shares: the machine's CPU model and appending a section to bench/results.md."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

HEADER = "# Benchmarks\n\nMeasured results, newest last. Each section names its machine.\n"


def cpu_model() -> str:
    """The CPU's model name (lscpu), or what Python's platform module knows."""
    out = subprocess.run(
        ["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True, text=True
    ).stdout.strip()
    return out or platform.processor() or platform.machine()


def publish(text: str, out: str | Path) -> None:
    """Print a results section and append it to `out` (created with the header if missing)."""
    print(text)
    path = Path(out)
    if not path.exists():
        path.write_text(HEADER)
    with path.open("a") as f:
        f.write(text)
