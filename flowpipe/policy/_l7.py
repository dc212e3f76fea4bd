"""L7 rules from observed requests: HTTP method and anchored path regexes (ids generalized), Kafka role/topic."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

from flowpipe.policy.model import HTTPRule, KafkaRule

ID_SEGMENT = re.compile(
    r"^(\d+|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{12,}|[A-Za-z0-9_-]{24,})$",
    re.IGNORECASE,
)
"""A path segment that looks like an id (number, UUID, hex hash, long token): generalized when it varies."""


def http_rules(requests: Mapping[tuple[str, str], int]) -> tuple[HTTPRule, ...]:
    """HTTP rules for observed (method, path) pairs: anchored path regexes, ids generalized when they vary.

    >>> [r.path for r in http_rules({("GET", "/items/1"): 1, ("GET", "/items/2"): 1, ("GET", "/health"): 1})]
    ['^/health$', '^/items/[^/]+$']

    A segment that looks like an id (a number, UUID, hash or long token) becomes `[^/]+` only when several
    distinct values were seen at that place; a query string seen on a path adds an optional `(\\?.*)?`.
    """
    groups: dict[tuple[str, tuple[str | None, ...]], list[tuple[list[str], bool]]] = defaultdict(list)
    for method, target in requests:
        path, _, query = target.partition("?")
        segments = path.split("/")
        template = tuple(None if ID_SEGMENT.match(s) else s for s in segments)
        groups[(method, template)].append((segments, bool(query)))
    rules = set()
    for (method, template), seen in groups.items():
        parts = []
        for i, literal in enumerate(template):
            values = {segments[i] for segments, _ in seen}
            if literal is None and len(values) > 1:
                parts.append("[^/]+")
            else:
                parts.append(re.escape(literal if literal is not None else next(iter(values))))
        query = r"(\?.*)?" if any(q for _, q in seen) else ""
        rules.add(HTTPRule(method=method, path="^" + "/".join(parts) + query + "$"))
    return tuple(sorted(rules, key=lambda r: (r.path or "", r.method or "")))


def kafka_rules(uses: Iterable[tuple[str, str | None]]) -> tuple[KafkaRule, ...]:
    """Kafka rules for observed (role, topic) pairs; a role seen with topics needs no topic-less rule."""
    pairs = set(uses)
    with_topic = {role for role, topic in pairs if topic}
    kept = {(role, topic) for role, topic in pairs if topic or role not in with_topic}
    return tuple(
        KafkaRule(role=role, topic=topic) for role, topic in sorted(kept, key=lambda p: (p[0], p[1] or ""))
    )
