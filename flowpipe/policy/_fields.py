"""Reading the fields of a policy document: typed getters that fail with the file, document and field path."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, NoReturn

from flowpipe.errors import PolicyParseError
from flowpipe.policy.model import LabelExpression, LabelSelector

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", re.IGNORECASE)


class Where:
    """The file and document being parsed, for error messages."""

    def __init__(self, path: str, index: int) -> None:
        self.path = path
        self.index = index

    def fail(self, field: str, message: str) -> NoReturn:
        """Raise `PolicyParseError` for `field` of this document."""
        raise PolicyParseError(
            f"{field}: {message}" if field else message, path=self.path, document_index=self.index
        )


def check_api(api: Any, expected: str, where: Where, prefix: str) -> None:
    """Fail unless `apiVersion` is the one the kind belongs to."""
    if api != expected:
        where.fail(prefix + "apiVersion", f"expected {expected!r}, got {api!r}")


def metadata(
    doc: dict[str, Any], where: Where, prefix: str, *, namespaced: bool
) -> tuple[str, str | None, Any]:
    """(name, namespace, labels) from `metadata`; a namespaced kind without a namespace lives in `default`."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        where.fail(prefix + "metadata", "missing field (a mapping with at least `name`)")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        where.fail(prefix + "metadata.name", "missing field")
    namespace = meta.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        where.fail(prefix + "metadata.namespace", "must be a string")
    if not namespaced:
        namespace = None
    elif namespace is None:
        namespace = "default"
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        where.fail(prefix + "metadata.labels", "must be a mapping")
    return name, namespace, tuple((str(k), str(v)) for k, v in labels.items())


def mapping(
    obj: dict[str, Any], key: str, where: Where, field: str, *, required: bool = False
) -> dict[str, Any] | None:
    """`obj[key]` as a mapping (None when absent and not `required`)."""
    value = obj.get(key)
    if value is None:
        if required:
            where.fail(field, "missing field")
        return None
    if not isinstance(value, dict):
        where.fail(field, f"expected a mapping, got {type(value).__name__}")
    return value


def list_field(obj: dict[str, Any], key: str, where: Where, prefix: str) -> list[Any]:
    """`obj[key]` as a list ([] when absent)."""
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        where.fail(prefix + key, f"expected a list, got {type(value).__name__}")
    return value


def string_list(obj: dict[str, Any], key: str, where: Where, prefix: str) -> list[str]:
    """`obj[key]` as a list of strings."""
    values = list_field(obj, key, where, prefix)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            where.fail(f"{prefix}{key}[{i}]", f"expected a string, got {value!r}")
    return values


def selector(value: Any, where: Where, field: str) -> LabelSelector:
    """A label selector (matchLabels / matchExpressions), checked as Kubernetes checks it."""
    if value is None:
        return LabelSelector()
    if not isinstance(value, dict):
        where.fail(field, f"expected a label selector (matchLabels / matchExpressions), got {value!r}")
    unknown = set(value) - {"matchLabels", "matchExpressions"}
    if unknown:
        where.fail(field, f"unknown selector field(s) {', '.join(sorted(map(str, unknown)))}")
    labels = value.get("matchLabels") or {}
    if not isinstance(labels, dict):
        where.fail(field + ".matchLabels", "expected a mapping")
    for key, val in labels.items():
        if not isinstance(val, str):
            where.fail(f"{field}.matchLabels.{key}", f"label values are strings; quote {val!r}")
    expressions = []
    for i, expr in enumerate(value.get("matchExpressions") or []):
        at = f"{field}.matchExpressions[{i}]"
        if not isinstance(expr, dict) or not isinstance(expr.get("key"), str):
            where.fail(at, "expected a mapping with `key`, `operator` and `values`")
        operator = expr.get("operator")
        if operator not in OPERATORS:
            where.fail(at + ".operator", f"{operator!r} is not one of {', '.join(OPERATORS)}")
        values = expr.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            where.fail(at + ".values", "expected a list of strings")
        if operator in ("In", "NotIn") and not values:
            where.fail(at + ".values", f"operator {operator} needs at least one value")
        expressions.append(LabelExpression(expr["key"], operator, tuple(values)))
    return LabelSelector(tuple((str(k), v) for k, v in labels.items()), tuple(expressions))


def cidr(value: Any, where: Where, field: str) -> str:
    """A CIDR string that parses."""
    if not isinstance(value, str):
        where.fail(field, f"expected a CIDR string, got {value!r}")
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        where.fail(field, f"{value!r} is not a CIDR")
    return value


def regex(value: Any, where: Where, field: str) -> str | None:
    """A regular expression string that compiles (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, str):
        where.fail(field, f"expected a regular expression string, got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        where.fail(field, f"invalid regular expression {value!r}: {exc}")
    return value
