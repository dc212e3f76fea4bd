"""Helpers for the policy tests: hand-built flow rows (pods, reserved identities, requests) and schema checks."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pyarrow as pa

from flowpipe.model import FLOW_SCHEMA

DB_NETWORK_POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 5432}]
"""
"""A NetworkPolicy in namespace shop: pods `app: db` accept only `app: api` on TCP 5432."""


def pod(namespace: str, app: str, **labels: str) -> dict[str, Any]:
    """One end of a flow: a pod of workload `app` in `namespace`, with Cilium labels as Hubble reports them."""
    extra = [f"k8s:{k.replace('_', '-')}={v}" for k, v in labels.items()]
    return {
        "namespace": namespace,
        "pod_name": f"{app}-7d4b9c8f6-x2x9z",
        "workload_name": app,
        "workload_kind": "Deployment",
        # As in Cilium, the identity follows the label set: pods with other labels have another identity.
        "identity": 1000 + sum(map(ord, namespace + app + "".join(extra))),
        "labels": sorted(
            [
                f"k8s:app={app}",
                f"k8s:io.kubernetes.pod.namespace={namespace}",
                f"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={namespace}",
                f"k8s:io.cilium.k8s.policy.serviceaccount={app}",
                "k8s:io.cilium.k8s.policy.cluster=default",
                *extra,
            ]
        ),
        "ip": f"10.0.{len(namespace)}.{len(app)}",
    }


def reserved(
    name: str, ip: str | None = None, identity: int | None = None, names: list[str] | None = None
) -> dict[str, Any]:
    """A reserved identity (`world`, `host`, `remote-node`, `kube-apiserver`, ...) at `ip`."""
    numbers = {"host": 1, "world": 2, "health": 4, "remote-node": 6, "kube-apiserver": 7}
    return {
        "identity": identity if identity is not None else numbers.get(name, 2),
        "labels": [f"reserved:{name}"],
        "ip": ip,
        "names": names or [],
    }


def flow(
    src: dict[str, Any], dst: dict[str, Any], port: int | None = 80, protocol: str = "TCP", **fields: Any
) -> dict[str, Any]:
    """A request row from `src` to `dst` (FORWARDED, not a reply, no direction unless given)."""
    row: dict[str, Any] = {
        "verdict": "FORWARDED",
        "flow_type": "L3_L4",
        "is_reply": False,
        "l4_protocol": protocol,
        "source_port": 40000 if protocol in ("TCP", "UDP", "SCTP") else None,
        "destination_port": port if protocol in ("TCP", "UDP", "SCTP") else None,
        "tcp_flags": "SYN" if protocol == "TCP" else None,
    }
    for prefix, end in (("source", src), ("destination", dst)):
        for key, value in end.items():
            row[f"{prefix}_{key}"] = value
    row.update(fields)
    return row


def table(*rows: dict[str, Any]) -> pa.Table:
    """The rows as a flow table (missing columns are NULL, lists empty)."""
    full = []
    for row in rows:
        full.append(
            {
                name: row.get(name, [] if pa.types.is_list(FLOW_SCHEMA.field(name).type) else None)
                for name in FLOW_SCHEMA.names
            }
        )
    return pa.Table.from_pylist(full, schema=FLOW_SCHEMA)


KUBERNETES_VERSION = "1.30.0"

FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("cidr", raises=ValueError)
def _is_cidr(value: object) -> bool:
    # The Cilium schemas mark CIDR fields with a format jsonschema does not know by itself.
    if isinstance(value, str):
        ipaddress.ip_network(value, strict=False)
    return True


def cilium_schema(schemas: Path, kind: str) -> dict[str, Any]:
    """The object schema of a Cilium kind, from its OpenAPI file (which holds the openAPIV3Schema itself).

    Patterns that Python's `re` cannot compile (Go's `\\PC` class, used only by fields flowpipe never writes)
    are dropped, so that jsonschema can run; everything else is checked as written.
    """
    data = json.loads((schemas / f"{kind.lower()}.v2.openapi.json").read_text())
    for key in ("openAPIV3Schema", "schema"):  # tolerate CRD-style wrappers
        if isinstance(data.get(key), dict):
            data = data[key]
    assert data.get("type") == "object" and "spec" in data["properties"]
    return _python_patterns(data)


def _python_patterns(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _python_patterns(v) for k, v in node.items()}
        if isinstance(out.get("pattern"), str):
            try:
                re.compile(out["pattern"])
            except re.error:
                del out["pattern"]
        return out
    if isinstance(node, list):
        return [_python_patterns(v) for v in node]
    return node


def validate_document(doc: dict[str, Any], schemas: Path) -> None:
    """Validate one rendered document: Kubernetes kinds with kubernetes-validate, Cilium kinds with jsonschema,
    Istio AuthorizationPolicies field by field, with istiod's rules and with Istio's CRD schema where it is
    present (`validate_authorization_policy`)."""
    if doc["kind"] == "NetworkPolicy":
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    elif doc["kind"] == "AuthorizationPolicy":
        validate_authorization_policy(doc)
    else:
        schema = cilium_schema(schemas, doc["kind"])
        jsonschema.Draft202012Validator(schema, format_checker=FORMATS).validate(doc)


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_SOURCE_FIELDS = {
    "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces", "notNamespaces",
    "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks", "serviceAccounts", "notServiceAccounts",
}  # fmt: skip
_OPERATION_FIELDS = {"hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"}
_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


ISTIO_SCHEMAS = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "istio"
"""Istio's AuthorizationPolicy CRD schema (`../shared/schemas/istio`), absent where `../shared` is."""
_CEL_RULES = {
    "Cannot set serviceAccounts with namespaces or principals",
    "wildcard not allowed in label value match",
    "wildcard not allowed in label key match",
    "key must not be empty",
    "cross namespace referencing is not currently supported",
    "only one of targetRefs or selector can be set",
}
"""The CRD's CEL rules (`x-kubernetes-validations`, by message) that `_cel_checks` implements."""


class AuthorizationPolicyError(ValueError):
    """An AuthorizationPolicy document breaks the security.istio.io/v1 API or a rule of istiod."""


def istio_schema(schemas: Path) -> dict[str, Any]:
    """The CRD's `openAPIV3Schema` as a JSON Schema that rejects what the API server would not keep.

    The API server prunes unknown fields (and `kubectl apply` refuses them): every object with `properties`
    and no `additionalProperties` or `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`.
    The document's own `apiVersion`, `kind` and `metadata` are required. CEL rules cannot run in jsonschema:
    each one must be among those `_cel_checks` implements, so a new rule in the schema fails loudly.
    """
    data = json.loads((schemas / "authorizationpolicy.security.istio.io.v1.openapi.json").read_text())
    for key in ("openAPIV3Schema", "schema"):
        if isinstance(data.get(key), dict):
            data = data[key]
    rules: set[str] = set()

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(v) for v in node]
        if not isinstance(node, dict):
            return node
        rules.update(r["message"] for r in node.get("x-kubernetes-validations", ()))
        out = {
            k: convert(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"
        }
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out

    schema = convert(data)
    unknown = rules - _CEL_RULES
    assert not unknown, f"CEL rules of the Istio schema without a check here: {sorted(unknown)}"
    schema["properties"].update(
        apiVersion={"enum": ["security.istio.io/v1", "security.istio.io/v1beta1"]},
        kind={"const": "AuthorizationPolicy"},
        metadata={"type": "object"},
    )
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


def _cel_checks(doc: dict[str, Any], fail: Any) -> None:
    spec = doc.get("spec") or {}
    if sum(1 for key in ("selector", "targetRef", "targetRefs") if key in spec) > 1:
        fail("spec", "only one of targetRefs or selector can be set")
    for key, value in ((spec.get("selector") or {}).get("matchLabels") or {}).items():
        if "*" in key or "*" in value or not key:
            fail("spec.selector.matchLabels", f"{key}={value}: no wildcard, no empty key")
    for ref in [spec["targetRef"]] if "targetRef" in spec else list(spec.get("targetRefs") or ()):
        if ref.get("namespace"):
            fail("spec.targetRef", "cross namespace referencing is not currently supported")
    for i, rule in enumerate(spec.get("rules") or ()):
        for entry in rule.get("from") or ():
            source = entry.get("source") or {}
            accounts = "serviceAccounts" in source or "notServiceAccounts" in source
            if accounts and {"principals", "notPrincipals", "namespaces", "notNamespaces"} & set(source):
                fail(f"spec.rules[{i}].from", "cannot set serviceAccounts with namespaces or principals")


def istiod_path_error(path: str) -> str | None:
    """What istiod 1.22 and later say of a `paths` entry (None: accepted), from Istio's documentation.

    Only `{*}` (one segment) and `{**}` (any segments, the last operator) may hold braces; in a path with
    either, every other segment must be made of RFC 3986 path characters (`*` is not one).
    """
    if path == "":
        return "empty value not allowed"
    parts = path.strip("/").split("/")
    operators = [i for i, part in enumerate(parts) if part in ("{*}", "{**}")]
    if any(("{" in part or "}" in part) and i not in operators for i, part in enumerate(parts)):
        return "contains '{' or '}' beyond a supported path template"
    if "{**}" in parts and operators[-1] != parts.index("{**}"):
        return "{**} is not the last operator"
    literal = re.compile(r"^[A-Za-z0-9\-._~%!$&'()+,;:@=]+$")
    if operators and not all(literal.match(part) for i, part in enumerate(parts) if i not in operators):
        return "contains a segment with an invalid string literal"
    return None


def validate_authorization_policy(doc: dict[str, Any]) -> None:
    """Check an Istio `AuthorizationPolicy` (security.istio.io/v1) field by field, as istiod and the CRD do.

    The fields of the v1 API reference are checked explicitly: the object and metadata shape,
    `selector.matchLabels` with valid label names and values, `action`, and each rule's `from.source`,
    `to.operation` and `when` with only known fields, non-empty string lists, CIDRs in IP blocks, ports as
    numeric strings, HTTP methods, Istio's string matching (a `*` only at the start or the end, except in paths),
    and istiod's path rules (`istiod_path_error`). Where Istio's CRD schema is present (`ISTIO_SCHEMAS`), the
    document is also validated against it. Raises `AuthorizationPolicyError` naming the field, or
    `jsonschema.ValidationError`.
    """

    def fail(where: str, what: str) -> None:
        raise AuthorizationPolicyError(f"{where}: {what}")

    if ISTIO_SCHEMAS.is_dir():
        jsonschema.Draft202012Validator(istio_schema(ISTIO_SCHEMAS)).validate(doc)
        _cel_checks(doc, fail)
    if set(doc) != {"apiVersion", "kind", "metadata", "spec"}:
        fail("document", f"fields {sorted(doc)}")
    if doc["apiVersion"] != "security.istio.io/v1" or doc["kind"] != "AuthorizationPolicy":
        fail("document", f"{doc['apiVersion']} {doc['kind']}")
    meta = doc["metadata"]
    if not set(meta) <= {"name", "namespace", "labels", "annotations"}:
        fail("metadata", f"fields {sorted(meta)}")
    if not (
        isinstance(meta.get("name"), str) and len(meta["name"]) <= 253 and _DNS_SUBDOMAIN.match(meta["name"])
    ):
        fail("metadata.name", repr(meta.get("name")))
    if not (isinstance(meta.get("namespace"), str) and len(meta["namespace"]) <= 63
            and _DNS_LABEL.match(meta["namespace"])):  # fmt: skip
        fail("metadata.namespace", repr(meta.get("namespace")))
    spec = doc["spec"]
    if not isinstance(spec, dict) or not set(spec) <= {"selector", "targetRef", "targetRefs", "action", "provider",
                                                       "rules"}:  # fmt: skip
        fail("spec", f"fields {sorted(spec) if isinstance(spec, dict) else spec}")
    if "selector" in spec:
        selector = spec["selector"]
        if set(selector) != {"matchLabels"} or not isinstance(selector["matchLabels"], dict):
            fail("spec.selector", repr(selector))
        for key, value in selector["matchLabels"].items():
            if not (isinstance(key, str) and _LABEL_NAME.match(key)) or not (
                isinstance(value, str) and len(value) <= 63 and _LABEL_VALUE.match(value)
            ):
                fail("spec.selector.matchLabels", f"{key}={value}")
    if spec.get("action", "ALLOW") not in ("ALLOW", "DENY", "AUDIT", "CUSTOM"):
        fail("spec.action", repr(spec["action"]))
    if spec.get("action") == "CUSTOM" and "provider" not in spec:
        fail("spec.provider", "CUSTOM needs a provider")
    for i, rule in enumerate(spec.get("rules") or ()):
        where = f"spec.rules[{i}]"
        if not isinstance(rule, dict) or not set(rule) <= {"from", "to", "when"}:
            fail(where, repr(rule))
        for j, entry in enumerate(rule.get("from") or ()):
            if set(entry) != {"source"} or not set(entry["source"]) <= _SOURCE_FIELDS or not entry["source"]:
                fail(f"{where}.from[{j}]", repr(entry))
            for field, values in entry["source"].items():
                _strings(values, f"{where}.from[{j}].source.{field}", fail)
                if "IpBlocks" in field or field == "ipBlocks":
                    for value in values:
                        ipaddress.ip_network(value, strict=False)
        for j, entry in enumerate(rule.get("to") or ()):
            if (
                set(entry) != {"operation"}
                or not set(entry["operation"]) <= _OPERATION_FIELDS
                or not entry["operation"]
            ):
                fail(f"{where}.to[{j}]", repr(entry))
            for field, values in entry["operation"].items():
                paths = field in ("paths", "notPaths")
                _strings(values, f"{where}.to[{j}].operation.{field}", fail, stars=not paths)
                if field in ("ports", "notPorts") and not all(
                    v.isdigit() and 0 < int(v) < 65536 for v in values
                ):
                    fail(f"{where}.to[{j}].operation.{field}", repr(values))
                if field in ("methods", "notMethods") and not set(values) <= _HTTP_METHODS:
                    fail(f"{where}.to[{j}].operation.{field}", repr(values))
                if paths and not all(v.startswith(("/", "*")) for v in values):
                    fail(f"{where}.to[{j}].operation.{field}", repr(values))
                for value in values if paths else ():
                    error = istiod_path_error(value)
                    if error is not None:
                        fail(f"{where}.to[{j}].operation.{field}", f"{value!r}: istiod refuses it: {error}")
        for j, condition in enumerate(rule.get("when") or ()):
            if not set(condition) <= {"key", "values", "notValues"} or not isinstance(
                condition.get("key"), str
            ):
                fail(f"{where}.when[{j}]", repr(condition))


def _strings(values: Any, where: str, fail: Any, *, stars: bool = True) -> None:
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        fail(where, f"must be a non-empty list of strings, got {values!r}")
    for value in values if stars else ():
        if "*" in value.strip("*") or value.count("*") > 1 and value != "*":
            fail(where, f"{value!r}: Istio matches exactly, by prefix or suffix (one * at an end)")
