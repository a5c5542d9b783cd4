"""Turn a manifest into a typed job, or into a list of errors that each name a field and a fix."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ._base import GROUP_VERSION, RULES_ERROR_TYPE
from .crd import openapi_schema
from .resources import JOB_KINDS, MAX_JOB_NAME_LENGTH, FineTuneJob, Job, TrainingJob


@dataclass(frozen=True)
class FieldError:
    """One problem in a manifest: the field's dotted path, what is wrong, and how to fix it."""

    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" + (f" — fix: {self.fix}" if self.fix else "")


class InvalidJobError(ValueError):
    """A manifest that can never run. `errors` lists every problem found, each naming its field."""

    def __init__(self, errors: Sequence[FieldError], name: str | None = None) -> None:
        self.errors = list(errors)
        self.name = name
        super().__init__("; ".join(str(e) for e in self.errors))


def parse_job(manifest: Any) -> Job:
    """Parse a whole TrainingJob/FineTuneJob manifest, or raise InvalidJobError with every problem."""
    if not isinstance(manifest, dict):
        raise InvalidJobError(
            [
                FieldError(
                    "(document)",
                    f"expected a mapping, got {type(manifest).__name__}",
                    "write a Kubernetes object with apiVersion, kind, metadata, spec",
                )
            ]
        )
    errors: list[FieldError] = []
    if manifest.get("apiVersion") != GROUP_VERSION:
        errors.append(
            FieldError(
                "apiVersion",
                f"expected {GROUP_VERSION}, got {manifest.get('apiVersion')!r}",
                f"set apiVersion: {GROUP_VERSION}",
            )
        )
    cls = JOB_KINDS.get(manifest.get("kind")) if isinstance(manifest.get("kind"), str) else None
    if cls is None:
        errors.append(
            FieldError(
                "kind", f"unknown kind {manifest.get('kind')!r}", "set kind: TrainingJob or kind: FineTuneJob"
            )
        )
        raise InvalidJobError(errors, _name_of(manifest))
    try:
        job = cls.model_validate(manifest)
    except ValidationError as exc:
        errors += errors_from_validation(exc, cls)
    if errors:
        raise InvalidJobError(_unique(errors), _name_of(manifest))
    return job


def parse_spec(kind: str, spec: Any) -> Any:
    """Parse only a spec (what kopf hands a handler); errors are prefixed with `spec.`."""
    cls = JOB_KINDS[kind]
    spec_model = cls.model_fields["spec"].annotation
    try:
        return spec_model.model_validate(spec)
    except ValidationError as exc:
        raise InvalidJobError(_unique(errors_from_validation(exc, cls, prefix=("spec",)))) from None


def _name_of(manifest: dict[str, Any]) -> str | None:
    meta = manifest.get("metadata")
    return meta.get("name") if isinstance(meta, dict) and isinstance(meta.get("name"), str) else None


def _unique(errors: list[FieldError]) -> list[FieldError]:
    seen: dict[tuple[str, str], FieldError] = {}
    for e in errors:
        seen.setdefault((e.path, e.message), e)
    return list(seen.values())


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(document)"


def errors_from_validation(
    exc: ValidationError, cls: type[TrainingJob] | type[FineTuneJob], prefix: tuple[Any, ...] = ()
) -> list[FieldError]:
    out: list[FieldError] = []
    for err in exc.errors(include_url=False):
        loc = prefix + tuple(err["loc"])
        if err["type"] == RULES_ERROR_TYPE:
            for issue in err["ctx"]["issues"]:
                out.append(FieldError(_dotted(loc + tuple(issue["path"])), issue["message"], issue["fix"]))
            continue
        out.append(FieldError(_dotted(loc), _message(err), _fix(err, loc, cls)))
    return out


def _message(err: dict[str, Any]) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"unknown field '{err['loc'][-1]}'"
    if err["type"] == "missing":
        return "required field is missing"
    if "input" in err and not isinstance(err["input"], (dict, list)) and str(err["input"]) not in msg:
        return f"{msg} (got {err['input']!r})"
    return msg


def _schema_at(cls: type[TrainingJob] | type[FineTuneJob], loc: Sequence[Any]) -> dict[str, Any] | None:
    """The CRD schema node for a location, to suggest field names and show bounds."""
    if not loc or loc[0] != "spec":
        return None
    node: dict[str, Any] | None = openapi_schema(cls.model_fields["spec"].annotation)
    for part in loc[1:]:
        if node is None:
            return None
        if isinstance(part, int):
            node = node.get("items")
        else:
            node = (node.get("properties") or {}).get(part)
    return node


# Pydantic error type → the fix, where it does not depend on the field.
_FIXES = {
    "int_parsing": "write a whole number without quotes",
    "int_type": "write a whole number without quotes",
    "int_from_float": "write a whole number without quotes",
    "float_parsing": "write a number without quotes (e.g. 3e-4)",
    "float_type": "write a number without quotes (e.g. 3e-4)",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "string_type": "write a string (quote it in YAML)",
    "dict_type": "write a mapping of fields (key: value) here",
    "model_type": "write a mapping of fields (key: value) here",
    "model_attributes_type": "write a mapping of fields (key: value) here",
    "list_type": "write a list (- item) here",
    "quantity": "write a quantity such as 16Gi or 512Mi (memory), 4 or 500m (CPU)",
    "storage_uri": "use s3://bucket/prefix, gs://bucket/prefix, pvc://claim/path, file:///abs/path or a path",
}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _fix(err: dict[str, Any], loc: tuple[Any, ...], cls: type[TrainingJob] | type[FineTuneJob]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    field = str(loc[-1]) if loc else ""
    if kind == "extra_forbidden":
        return _fix_unknown_field(field, loc, cls)
    if kind == "missing":
        desc = (_schema_at(cls, loc) or {}).get("description", "")
        return f"add {field}" + (f" ({desc})" if desc else "")
    if kind == "literal_error":
        return f"use one of {ctx.get('expected')}"
    if kind in _BOUNDS:
        return _fix_out_of_bounds(_schema_at(cls, loc) or {})
    if kind == "string_too_long" and loc == ("metadata", "name"):
        return (
            f"use at most {MAX_JOB_NAME_LENGTH} characters: the Ray cluster "
            f"'<name>-{cls.SHORT_NAME}' must fit KubeRay's 47-character limit"
        )
    if kind == "string_pattern_mismatch" and loc == ("metadata", "name"):
        return "use lowercase letters, digits and '-', starting with a letter and ending alphanumeric"
    sized = {
        "string_too_long": f"shorten it to at most {ctx.get('max_length')} characters",
        "string_too_short": f"use at least {ctx.get('min_length')} characters",
        "too_short": f"give at least {ctx.get('min_length')} item(s)",
        "too_long": f"give at most {ctx.get('max_length')} item(s)",
        "string_pattern_mismatch": f"match the pattern {ctx.get('pattern')}",
    }
    return sized.get(kind) or _FIXES.get(kind, "")


def _fix_unknown_field(field: str, loc: tuple[Any, ...], cls: type[TrainingJob] | type[FineTuneJob]) -> str:
    """The closest known field's name, or the fields known there."""
    if loc[:1] == ("metadata",):
        return "remove it"
    known = sorted(((_schema_at(cls, loc[:-1]) or {}).get("properties") or {}).keys())
    close = difflib.get_close_matches(field, known, n=1, cutoff=0.6) or [
        k for k in known if k.lower() == field.lower()
    ]
    if close:
        return f"did you mean '{close[0]}'?"
    return f"remove it; known fields here: {', '.join(known)}" if known else "remove it"


def _fix_out_of_bounds(node: dict[str, Any]) -> str:
    lo, hi = node.get("minimum"), node.get("maximum")
    lo_op = ">" if node.get("exclusiveMinimum") else ">="
    hi_op = "<" if node.get("exclusiveMaximum") else "<="
    bounds = [f"{lo_op} {lo}" if lo is not None else "", f"{hi_op} {hi}" if hi is not None else ""]
    text = " and ".join(b for b in bounds if b)
    return f"use a value {text}" if text else "use a value in range"
