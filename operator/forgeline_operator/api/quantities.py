"""Kubernetes CPU quantities as numbers: the one parser the operator and the trainer share."""

from __future__ import annotations

import re

_CPU_RE = re.compile(r"^(?P<value>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<milli>m?)$")
CPU_FIX = "write CPUs as e.g. 4, 1.5 or 500m"


def _parse_cpu(quantity: str | int | float) -> float | str:
    """The CPUs, or what is wrong with the quantity."""
    if isinstance(quantity, bool):
        return f"{quantity!r} is not a CPU quantity"
    if isinstance(quantity, (int, float)):
        value = float(quantity)
    else:
        match = _CPU_RE.match(quantity.strip())
        if not match:
            return f"cannot read {quantity!r} as CPUs"
        value = float(match["value"]) / (1000 if match["milli"] else 1)
    return value if value > 0 else f"{quantity!r} CPUs is not positive"


def cpu_problem(quantity: str | int | float) -> str | None:
    """What is wrong with a CPU quantity, or None when it reads as a positive number of CPUs."""
    parsed = _parse_cpu(quantity)
    return parsed if isinstance(parsed, str) else None


def cpu_cores(quantity: str | int | float, field: str = "spec.resources.cpu") -> float:
    """CPUs in a Kubernetes CPU quantity (`4`, `1.5`, `500m`); ValueError naming `field` otherwise.

    Strict on purpose: `2Gi` is a valid Kubernetes quantity but no CPU count, and guessing one
    (say 1 CPU) would size threads and Ray resources wrongly."""
    parsed = _parse_cpu(quantity)
    if isinstance(parsed, str):
        raise ValueError(f"{field}: {parsed}; {CPU_FIX}")
    return parsed
