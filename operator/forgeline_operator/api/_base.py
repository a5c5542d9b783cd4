"""Building blocks shared by every API model: the base class, value types and rule errors.

Every model is camelCase on the wire (as Kubernetes is) and snake_case in Python, forbids unknown
fields, and documents each field with the docstring under it: those docstrings become the CRD's
descriptions, so `kubectl explain` shows them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, NamedTuple

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

API_GROUP = "forgeline.dev"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"


class ApiModel(BaseModel):
    """Base of every Forgeline API object: camelCase aliases, no unknown fields, docstrings."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=False,
    )

    def to_dict(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def sub(model: type[ApiModel], **kwargs: Any) -> Any:
    """A nested object that is always present, with its own defaults.

    The CRD gets `default: {}` so the apiserver fills the nested defaults in as pydantic does.
    """
    return Field(default_factory=model, json_schema_extra={"default": {}}, **kwargs)


# -- value types -------------------------------------------------------------------------------

_QUANTITY_RE = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


def _quantity_to_str(value: Any) -> Any:
    if isinstance(value, bool):
        return value  # let the str validator reject it
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _check_quantity(value: str) -> str:
    if not re.match(_QUANTITY_RE, value):
        raise PydanticCustomError("quantity", "'{value}' is not a Kubernetes quantity", {"value": value})
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {"x-kubernetes-int-or-string": True, "pattern": _QUANTITY_RE},
    ),
]
"""A Kubernetes resource quantity such as `4`, `500m`, `16Gi`."""

_URI_SCHEMES = ("s3", "gs", "pvc", "file")
_URI_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")


def _check_uri(value: str) -> str:
    value = value.strip()
    if not value:
        raise PydanticCustomError("storage_uri", "must not be empty")
    match = _URI_RE.match(value)
    if match:
        scheme = match.group("scheme").lower()
        if scheme not in _URI_SCHEMES:
            raise PydanticCustomError(
                "storage_uri",
                "unsupported URI scheme '{scheme}://'; use s3://bucket/prefix, gs://bucket/prefix, "
                "pvc://claim/path, file:///abs/path or a plain path",
                {"scheme": scheme},
            )
        rest = match.group("rest")
        if scheme in ("s3", "gs", "pvc") and not rest.split("/", 1)[0]:
            raise PydanticCustomError(
                "storage_uri",
                "'{value}' names no {what}; write {scheme}://<{what}>/<path>",
                {"value": value, "scheme": scheme, "what": "claim" if scheme == "pvc" else "bucket"},
            )
    return value


StorageURI = Annotated[
    str,
    Field(min_length=1, max_length=1024),
    BeforeValidator(lambda v: _check_uri(v) if isinstance(v, str) else v),
]
"""Where data, checkpoints or outputs live: `s3://`, `gs://`, `pvc://claim/path`, `file://` or a path."""

HubId = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$", max_length=256)
]
"""A Hugging Face hub id such as `meta-llama/Llama-3.1-8B` (resolved from a mirror or cache)."""

K8sName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]


# -- cross-field rules -------------------------------------------------------------------------


class FieldIssue(NamedTuple):
    """One broken rule: the field (relative to the model that checks it), what is wrong, the fix."""

    path: tuple[str | int, ...]
    message: str
    fix: str


RULES_ERROR_TYPE = "forgeline_rules"


def raise_issues(issues: list[FieldIssue]) -> None:
    """Raise every broken cross-field rule at once, keeping each one's field path.

    Pydantic places the error at the model that ran the rule; `ctx["issues"]` carries the paths
    below it, which `forgeline_operator.api.errors` expands into one error per field.
    """
    if not issues:
        return
    summary = "; ".join(f"{'.'.join(map(str, i.path))}: {i.message}" for i in issues)
    raise PydanticCustomError(
        RULES_ERROR_TYPE,
        "{summary}",
        {"summary": summary, "issues": [i._asdict() for i in issues]},
    )
