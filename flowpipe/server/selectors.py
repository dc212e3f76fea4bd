"""Kubernetes label selectors (`app=web`, `tier in (a,b)`, `!key`) over Cilium labels (`k8s:app=web`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from flowpipe.errors import ConfigError


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    """One requirement of a k8s label selector; `source` is the Cilium label source or "" for any."""

    source: str
    key: str
    operator: str  # exists, !exists, in, notin, gt, lt
    values: frozenset[str] = field(default_factory=frozenset)


_SET_RE = re.compile(r"^(?P<key>[^\s!=<>(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_KEY_RE = re.compile(r"^[^\s!=<>(),]+$")


def _split_key(raw: str) -> tuple[str, str]:
    source, sep, key = raw.partition(":")
    if not sep:
        return "", raw
    return ("" if source == "any" else source), key


def parse_label_selector(text: str, where: str = "selector") -> list[LabelRequirement]:
    """Parse `key=value`, `key!=value`, `key in (a,b)`, `key notin (a)`, `key`, `!key`, `key>1` (ANDed by `,`)."""
    parts: list[str] = []
    depth, current = 0, list[str]()
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    requirements = []
    for raw in (p.strip() for p in parts):
        if not raw:
            if text.strip():
                raise ConfigError(f"{where}: empty requirement in label selector {text!r}")
            continue
        requirements.append(_parse_requirement(raw, text, where))
    return requirements


def _parse_requirement(raw: str, text: str, where: str) -> LabelRequirement:
    bad = ConfigError(f"{where}: cannot parse {raw!r} in label selector {text!r}")
    match = _SET_RE.match(raw)
    if match:
        values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
        source, key = _split_key(match["key"])
        return LabelRequirement(source, key, match["op"], values)
    if raw.startswith("!"):
        key_text = raw[1:].strip()
        if not _KEY_RE.match(key_text):
            raise bad
        return LabelRequirement(*_split_key(key_text), "!exists")
    for token, op in (("!=", "notin"), ("==", "in"), ("=", "in"), (">", "gt"), ("<", "lt")):
        if token in raw:
            key_text, _, value = raw.partition(token)
            key_text, value = key_text.strip(), value.strip()
            if not _KEY_RE.match(key_text) or any(c in value for c in "=!<>(), "):
                raise bad
            if op in ("gt", "lt"):
                try:
                    int(value)
                except ValueError:
                    raise bad from None
            return LabelRequirement(*_split_key(key_text), op, frozenset([value]))
    if not _KEY_RE.match(raw):
        raise bad
    return LabelRequirement(*_split_key(raw), "exists")


def split_label(label: str) -> tuple[str, str, str]:
    """A Cilium label `source:key=value` as (source, key, value); no source → "unspec"."""
    key_part, _, value = label.partition("=")
    source, sep, key = key_part.partition(":")
    if not sep:
        return "unspec", key_part, value
    return source, key, value


def selector_matches(requirements: Sequence[LabelRequirement], labels: Sequence[str]) -> bool:
    """Whether labels (Cilium `source:key=value` or plain `key=value`) satisfy every requirement."""
    parsed = [split_label(label) for label in labels]
    for req in requirements:
        values = [v for s, k, v in parsed if k == req.key and (not req.source or s == req.source)]
        op = req.operator
        if op == "exists":
            ok = bool(values)
        elif op == "!exists":
            ok = not values
        elif op == "in":
            ok = any(v in req.values for v in values)
        elif op == "notin":
            ok = not any(v in req.values for v in values)
        else:
            bound = int(next(iter(req.values)))
            ok = False
            for v in values:
                try:
                    number = int(v)
                except ValueError:
                    continue
                if (op == "gt" and number > bound) or (op == "lt" and number < bound):
                    ok = True
        if not ok:
            return False
    return True
