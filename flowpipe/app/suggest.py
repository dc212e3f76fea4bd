"""Draft policies from the dataset: a window's observed edges → drafts → replay proof → written files and summary.

`suggest_policies(engine, SuggestConfig(...))` runs the `observed_edges` question over a window, drafts the
policies of each requested format (`cilium`, `kubernetes`, `istio`), and proves each draft before offering it:

- Edges denied by the cluster's current policy (`status = 'denied'`: an end reported a policy drop for the
  connection) are never learned unless `learn_from_drops`; they are listed as kept denied.
- Each format's files are rendered, then parsed back from the exact text that is written (a name from a flow
  can never add a document or a key), and `flowpipe.policy.proof.prove_draft` replays the learned requests
  through those documents (for Istio, `istio.unallowed_requests`); with `verify_flows`, the stored flows of the
  window too.
- Nothing refuses the whole set. Edges a draft cannot allow are left out and listed (`Suggestion.left_out`),
  each with its reason and what the user can do: pods recorded with a reserved identity, unlabelled addresses
  inside the cluster's ranges, traffic a format cannot express, names Kubernetes would not accept. A namespace
  whose drafts would deny a request nothing explains is withheld and listed the same way; every other draft is
  offered. `Suggestion.partial` says whether anything was left out (the command then exits 3).
- With `existing` (paths of the user's current policies), only what is new is drafted: the learned requests
  the existing policies would deny are found by replaying them (at both ends), and minimal additional
  policies allow exactly those. They add allows and nothing else (Cilium drafts set `enableDefaultDeny:
  false`; a NetworkPolicy isolates only the directions of its rules, which the existing set isolates already
  for those pods), never reuse the name of an existing policy, and the proof replays the existing set plus
  the additions.

Policies apply to one cluster, so drafts are learned from the flows of one cluster: `cluster` (`--cluster`), or
the only one the window holds; a window with flows of several clusters and no `cluster` is refused with the
clusters found (`flowpipe.policy.clusters.choose_cluster`). The proof replays that cluster's stored flows only.

Files are named by a safe slug of the namespace (and workload), always inside the output folder and unique;
the real name is in the file. The output is deterministic: the same dataset and options give byte-identical
files. File headers carry the observed span of the learned flows (first and last), not the window asked for,
which moves with the clock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from flowpipe._resources import collector_paused
from flowpipe.errors import ConfigError, PolicyError, PolicyParseError
from flowpipe.policy._istio_paths import parse_istio_version
from flowpipe.policy.clusters import choose_cluster
from flowpipe.policy.draft import (
    DNS_PORT,
    Draft,
    LeftOut,
    Network,
    cluster_ranges,
    draft_policies,
    edge_text,
    valid_name,
)
from flowpipe.policy.edges import endpoint_namespace, learned_requests
from flowpipe.policy.istio import (
    ASSUMPTIONS,
    DEFAULT_ISTIO_VERSION,
    IstioPolicy,
    draft_authorization_policies,
    open_rules,
    render_istio,
    unallowed_requests,
)
from flowpipe.policy.load import load_documents, load_policies, policies_of
from flowpipe.policy.model import DIRECTIONS, Flavour, Policy
from flowpipe.policy.proof import MAX_NAMED_EDGES, StoredEdges, Subject, prove_draft, subjects
from flowpipe.policy.proof import edge_text as denied_text
from flowpipe.policy.render import Rendered, comment_block, printable, render_parts
from flowpipe.policy.replay import DeniedEdge, denied_directions
from flowpipe.query.catalog import load_questions
from flowpipe.query.engine import Engine
from flowpipe.query.run import bind_window, window_bound

Format = Literal["cilium", "kubernetes", "istio"]
FORMATS: dict[str, tuple[Format, ...]] = {
    "cilium": ("cilium",),
    "kubernetes": ("kubernetes",),
    "both": ("cilium", "kubernetes"),
    "istio": ("istio",),
}
"""`--format` choices and the formats each one drafts."""

KINDS: dict[Format, str] = {
    "cilium": "CiliumNetworkPolicy",
    "kubernetes": "NetworkPolicy",
    "istio": "AuthorizationPolicy",
}
EXIT_PARTIAL = 3
"""Exit status of `suggest` when some edges were left out (0: everything observed was drafted)."""
MAX_FILE_STEM = 100
"""File names longer than this (from long names) are cut and given a hash of the whole name."""


@dataclass(frozen=True, slots=True)
class SuggestConfig:
    """What `suggest` drafts: window, namespaces, formats, and how it learns and proves."""

    namespaces: tuple[str, ...] = field(default=(), metadata={"help": "Namespaces to draft (default: all)."})
    cluster: str | None = field(
        default=None,
        metadata={"help": "Draft for this cluster (cluster_name); needed when the window holds several."},
    )
    since: str = field(
        default="7d",
        metadata={"help": "Window start: 7d, 1h, an ISO timestamp, or `all` (from the first record)."},
    )
    until: str | None = field(
        default=None,
        metadata={
            "help": "Window end: now, a duration back, or a timestamp (default: the later of now and the newest "
            "record)."
        },
    )
    formats: tuple[Format, ...] = field(default=("cilium",), metadata={"help": "Formats to draft."})
    l7: bool = field(default=False, metadata={"help": "Add HTTP and Kafka rules (Cilium, Istio)."})
    learn_from_drops: bool = field(
        default=False,
        metadata={"help": "Also learn policy-denied connections (clusters already in default-deny)."},
    )
    per_workload: bool = field(default=False, metadata={"help": "One file per workload, not per namespace."})
    include_kube_system: bool = field(default=False, metadata={"help": "Draft kube-system too."})
    existing: tuple[str, ...] = field(
        default=(), metadata={"help": "Current policy files or folders: draft only what is new against them."}
    )
    verify_flows: bool = field(
        default=True, metadata={"help": "Also replay the window's stored flows through each draft."}
    )
    istio_version: str = field(
        default=DEFAULT_ISTIO_VERSION,
        metadata={"help": "Oldest Istio the Istio drafts must suit: ids in paths become {*} from 1.22 on, "
                          "prefix matches (wider) before."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not self.formats:
            raise ConfigError("choose at least one format (cilium, kubernetes, istio)")
        unknown = [f for f in self.formats if f not in KINDS]
        if unknown:
            raise ConfigError(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
        invalid = [n for n in self.namespaces if not valid_name(n)]
        if invalid:
            raise ConfigError(
                f"not a namespace name Kubernetes accepts (DNS-1123): {', '.join(map(repr, invalid))}"
            )
        if self.existing and "istio" in self.formats:
            raise ConfigError("--existing compares with Kubernetes and Cilium policies; use --format cilium, "
                              "kubernetes or both")  # fmt: skip
        parse_istio_version(self.istio_version)


@dataclass(frozen=True, slots=True)
class DraftFile:
    """One output file: its path relative to the output folder (a safe slug), and its text."""

    path: str
    format: Format
    namespace: str
    text: str
    policies: int
    rules: int


@dataclass(slots=True)
class FormatResult:
    """The proved draft of one format, and what it left out."""

    format: Format
    policies: list[Policy] | list[IstioPolicy]
    notes: list[str] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    """Edges this format's drafts do not allow, each with its reason and what to do."""
    requires: list[str] = field(default_factory=list)
    """Cluster settings the draft relies on."""
    review: list[str] = field(default_factory=list)
    """Rules worth a second look although the traffic was forwarded (ingress from the world)."""
    requests_proved: int = 0
    flows_proved: int | None = None
    covered: dict[str, int] = field(default_factory=dict)
    """Learned requests the drafts allow, per namespace (as client or server)."""
    denied: dict[str, int] = field(default_factory=dict)
    """Learned requests the replay of the drafts denies (those of the edges left out), per namespace."""

    @property
    def rules(self) -> int:
        """Rules over all policies (Istio: rules of the AuthorizationPolicies)."""
        return sum(_rule_count(p) for p in self.policies)

    @property
    def not_allowed(self) -> list[str]:
        """The left-out edges as `edge: reason` lines."""
        return [f"{lo.edge}: {lo.reason}" for lo in self.left_out]


@dataclass(slots=True)
class Suggestion:
    """What `suggest_policies` drafted, from which window, what it left out, and the files to write."""

    since: datetime
    until: datetime
    anchored_to: str
    window: tuple[datetime, datetime] | None
    edges: int
    requests: int
    results: list[FormatResult] = field(default_factory=list)
    files: list[DraftFile] = field(default_factory=list)
    existing_policies: int | None = None
    new_edges: list[str] = field(default_factory=list)
    """With `existing`: the learned requests (as edges) the existing policies would deny."""
    cluster: str | None = None
    """The cluster the flows were learned from (None: the flows carry no cluster name)."""
    denied: list[LeftOut] = field(default_factory=list)
    """Edges denied by the current policy, kept denied (not learned)."""
    invalid: list[LeftOut] = field(default_factory=list)
    """Edges left out of every format: an end's name is one Kubernetes would never accept."""

    @property
    def partial(self) -> bool:
        """True when some observed edge was left out of a format (not counting the edges kept denied)."""
        return bool(self.invalid) or any(r.left_out for r in self.results)

    def stream(self) -> str:
        """Every file as one multi-document YAML stream (what `suggest` prints without `--out`)."""
        return "---\n".join(f.text for f in self.files)

    def namespaces(self) -> list[str]:
        """Every namespace the summary speaks of, sorted."""
        found = {f.namespace for f in self.files}
        found |= {lo.namespace for r in self.results for lo in r.left_out if lo.namespace}
        found |= {lo.namespace for lo in self.denied + self.invalid if lo.namespace}
        found |= {ns for r in self.results for ns in r.covered}
        return sorted(found)

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON (`suggest --summary-format json`): the same facts as `summary()`."""
        namespaces: dict[str, Any] = {}
        for namespace in self.namespaces():
            formats = {}
            for result in self.results:
                policies = [p.name for p in result.policies if p.namespace == namespace]
                formats[result.format] = {
                    "policies": policies,
                    "files": [
                        f.path for f in self.files if f.format == result.format and f.namespace == namespace
                    ],
                    "requests_covered": result.covered.get(namespace, 0),
                    "replay": {
                        "learned_requests_allowed": result.covered.get(namespace, 0),
                        "learned_requests_denied": result.denied.get(namespace, 0),
                    },
                    "left_out": [lo.to_dict() for lo in result.left_out if lo.namespace == namespace],
                }
            namespaces[namespace] = {
                "formats": formats,
                "denied_kept_denied": [lo.to_dict() for lo in self.denied if lo.namespace == namespace],
                "left_out_invalid_names": [lo.to_dict() for lo in self.invalid if lo.namespace == namespace],
            }
        return {
            "cluster": self.cluster,
            "window": {
                "since": _time(self.since),
                "until": _time(self.until),
                "anchored_to": self.anchored_to,
            },
            "observed": [_time(t) for t in self.window] if self.window else None,
            "learned": {"requests": self.requests, "edges": self.edges},
            "existing_policies": self.existing_policies,
            "new_edges": list(self.new_edges),
            "formats": [
                {
                    "format": r.format,
                    "kind": KINDS[r.format],
                    "documents": len(r.policies),
                    "rules": r.rules,
                    "files": [f.path for f in self.files if f.format == r.format],
                    "replay": {
                        "learned_requests_allowed": r.requests_proved,
                        "stored_requests_allowed": r.flows_proved,
                    },
                    "requires": list(r.requires),
                    "review": list(r.review),
                    "notes": list(r.notes),
                    "left_out": [lo.to_dict() for lo in r.left_out],
                }
                for r in self.results
            ],
            "namespaces": namespaces,
            "denied_kept_denied": [lo.to_dict() for lo in self.denied],
            "left_out_invalid_names": [lo.to_dict() for lo in self.invalid],
            "partial": self.partial,
            "exit_status": EXIT_PARTIAL if self.partial else 0,
        }

    def summary(self) -> list[str]:
        """Lines for people (the review): what was learned; per namespace what was drafted, covered, left out
        and kept denied; each format's replay result. Text from flows is escaped."""
        lines = [f"learned {self.requests:,} requests in {self.edges:,} edges" + _of_cluster(self.cluster) + (
            f", observed {_time(self.window[0])} .. {_time(self.window[1])}" if self.window else "")]  # fmt: skip
        if self.existing_policies is not None:
            if not self.new_edges:
                lines.append(
                    f"nothing new: the {self.existing_policies} existing policies allow every request"
                )
            else:
                lines.append(f"{len(self.new_edges)} edges are new against the {self.existing_policies} "
                             "existing policies (they would deny them):")  # fmt: skip
                lines += _listed(self.new_edges)
        for namespace in self.namespaces():
            lines.append(f"namespace {namespace}:")
            for result in self.results:
                names = [p.name for p in result.policies if p.namespace == namespace]
                left = [lo for lo in result.left_out if lo.namespace == namespace]
                if not names and not left:
                    continue
                replay = "replay allows them all"
                if result.denied.get(namespace):
                    replay = f"replay denies {result.denied[namespace]:,} learned requests, those left out"
                lines.append(
                    f"  {result.format}: {len(names)} policies ({', '.join(names) or 'none'}), "
                    f"{result.covered.get(namespace, 0):,} requests covered ({replay})"
                    + (f"; {len({lo.edge for lo in left})} edges left out" if left else "")
                )
                lines += _left_out_lines(left, "    ")
            denied = [lo for lo in self.denied if lo.namespace == namespace]
            if denied:
                lines.append(f"  {len(denied)} edges denied by your current policy, left out (kept denied):")
                lines += _listed([f"{lo.edge} ({lo.requests} requests)" for lo in denied], "    ")
            invalid = [lo for lo in self.invalid if lo.namespace == namespace]
            lines += _left_out_lines(invalid, "  ")
        invalid = [lo for lo in self.invalid if not lo.namespace]
        lines += _left_out_lines(invalid, "")
        for result in self.results:
            files = [f for f in self.files if f.format == result.format]
            deny = sum(1 for p in result.policies if p.name == "flowpipe-default-deny")
            proof = f"replay allows all {result.requests_proved:,} learned requests"
            if result.left_out:
                proof = (f"replay allows {result.requests_proved:,} of the {self.requests:,} learned requests "
                         f"({len({lo.edge for lo in result.left_out})} edges left out)")  # fmt: skip
            if result.flows_proved is not None:
                proof += f", and {result.flows_proved:,} stored requests"
            lines.append(
                f"{result.format}: {len(result.policies)} {KINDS[result.format]} documents ({deny} default-deny), "
                f"{result.rules} rules in {len(files)} files; {proof}"
            )
            lines += [f"  requires: {r}" for r in result.requires]
            lines += [f"  review: {r}" for r in result.review]
            lines += [f"  note: {n}" for n in result.notes]
        if self.partial:
            lines.append(f"partial: some edges were left out (listed above); exit status {EXIT_PARTIAL}")
        return [printable(line) for line in lines]


def _listed(items: Sequence[str], indent: str = "  ") -> list[str]:
    lines = [f"{indent}{item}" for item in items[:MAX_NAMED_EDGES]]
    if len(items) > MAX_NAMED_EDGES:
        lines.append(f"{indent}... and {len(items) - MAX_NAMED_EDGES} more")
    return lines


def _left_out_lines(left_out: Sequence[LeftOut], indent: str) -> list[str]:
    """Left-out edges grouped by reason: the reason and what to do once, then the edges."""
    groups: dict[tuple[str, str, str], list[LeftOut]] = defaultdict(list)
    for lo in left_out:
        groups[(lo.kind, lo.reason, lo.action)].append(lo)
    lines = []
    for (kind, reason, action), items in sorted(groups.items()):
        lines.append(f"{indent}left out ({kind}): {reason}; what to do: {action}")
        requests: dict[str, int] = {}
        for lo in items:  # an edge met in the learned requests and in the stored flows is listed once
            requests[lo.edge] = max(requests.get(lo.edge, 0), lo.requests)
        lines += _listed([f"{edge} ({n} requests)" for edge, n in sorted(requests.items())], indent + "  ")
    return lines


def suggest_policies(engine: Engine, config: SuggestConfig, *, now: datetime | None = None) -> Suggestion:
    """Draft, prove and render the policies the window's traffic needs (see the module doc).

    >>> with open_engine("flowpipe-data") as engine:                       # doctest: +SKIP
    ...     suggestion = suggest_policies(engine, SuggestConfig(since="7d", formats=("cilium",)))
    >>> write_files(suggestion, Path("drafts"))                            # doctest: +SKIP

    Raises `PolicyError` when the window holds no request to learn from, `PolicyParseError` for unreadable
    `existing` files, and `ConfigError` when the window holds flows of several clusters and `config.cluster`
    names none of them. Edges that cannot be drafted are listed in the suggestion, never raised.
    """
    with collector_paused():  # a fleet's drafts are millions of objects that live on
        return _suggest(engine, config, now)


def _suggest(engine: Engine, config: SuggestConfig, now: datetime | None) -> Suggestion:
    rows, since, until, anchored_to, cluster = _observed_edges(engine, config, now)
    rows, denied_rows = split_denied(rows, learn_from_drops=config.learn_from_drops)
    invalid = _invalid_names(rows)
    rows = [r for i, r in enumerate(rows) if i not in invalid]
    if not rows:
        raise PolicyError(
            f"no requests to learn from between {window_bound(since)} and {window_bound(until)}"
            + _of_cluster(cluster)
            + (f" touching {', '.join(config.namespaces)}" if config.namespaces else "")
            + (f" ({len(denied_rows)} edges were denied by the current policy)" if denied_rows else "")
            + (f" ({len(invalid)} edges name what Kubernetes would not accept)" if invalid else "")
            + ": widen --since (--since all: every stored flow), check --namespace, or add --learn-from-drops for "
            "a cluster in default-deny"
        )
    window = _span(rows)
    suggestion = Suggestion(
        since, until, anchored_to, window, len(rows), sum(int(r["flows"] or 0) for r in rows), cluster=cluster
    )
    suggestion.invalid = list(invalid.values())
    suggestion.denied = [_denied(r) for r in denied_rows]
    kept_denied = {s for lo in suggestion.denied + suggestion.invalid for s in lo.subjects}
    learned = learned_requests(rows)
    stored = StoredEdges(engine, since, until, cluster) if config.verify_flows else None
    ranges = cluster_ranges(_known_addresses(engine, since, until, cluster))
    existing: list[Policy] | None = None
    if config.existing:
        existing = load_policies(config.existing)
        suggestion.existing_policies = len(existing)
    for fmt in config.formats:
        if fmt == "istio":
            result, files = _istio(rows, config, suggestion)
        else:
            if existing is not None:
                draft = _additions(rows, learned, existing, fmt, config, suggestion, ranges)
            else:
                draft = draft_policies(
                    rows,
                    flavour=_flavour(fmt),
                    namespaces=config.namespaces or None,
                    l7=config.l7,
                    include_kube_system=config.include_kube_system,
                    cluster_ranges=ranges,
                )
            result, files = _prove(
                draft, fmt, rows, learned, existing or [], stored, config, suggestion, kept_denied
            )
        suggestion.results.append(result)
        suggestion.files += files
    _unique_paths(suggestion.files)
    return suggestion


def write_files(suggestion: Suggestion, out: Path) -> list[Path]:
    """Write the suggestion's files under `out` (created if needed), each whole or not at all, never outside it."""
    root = out.resolve()
    written = []
    for draft_file in suggestion.files:
        path = out / draft_file.path
        if not path.resolve().is_relative_to(root):  # paths are slugs: this is a last line of defence
            raise PolicyError(f"refusing to write {draft_file.path!r} outside {out}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_text(draft_file.text, encoding="utf-8")
            os.replace(temporary, path)
        except OSError as exc:
            raise PolicyError(f"cannot write {path}: {exc.strerror or exc}") from exc
        written.append(path)
    return written


# -- learning -----------------------------------------------------------------------------------------------


def _observed_edges(
    engine: Engine, config: SuggestConfig, now: datetime | None
) -> tuple[list[dict[str, Any]], datetime, datetime, str, str | None]:
    """The window's observed edges of one cluster, the window, what it is anchored to, and the cluster."""
    question = load_questions().question("observed_edges")
    values: dict[str, object] = {
        "since": config.since,
        "learn_from_drops": config.learn_from_drops,
        "l7": config.l7 and config.formats != ("kubernetes",),
    }
    if config.until is not None:
        values["until"] = config.until
    if len(config.namespaces) == 1:
        values["namespace"] = config.namespaces[0]
    question.check_values(values)
    params, _, anchored_to = bind_window(engine, question, values, now=now)
    since, until = params["since"], params["until"]
    assert isinstance(since, datetime) and isinstance(until, datetime)
    # Chosen before the edges are grouped, so that a dataset of several clusters is refused at once.
    cluster = choose_cluster(engine, config.cluster, since, until, command="suggest")
    params["cluster"] = cluster
    rows = engine.run(question.sql, params, question=question.name).to_pylist()
    if len(config.namespaces) > 1:
        wanted = set(config.namespaces)
        rows = [
            r for r in rows
            if endpoint_namespace(r, "source") in wanted or endpoint_namespace(r, "destination") in wanted
        ]  # fmt: skip
    return rows, since, until, anchored_to, cluster


_KNOWN_ADDRESSES_SQL = """
SELECT DISTINCT ip FROM cluster_addresses
WHERE time >= $since AND time <= $until AND ($cluster IS NULL OR cluster_name = $cluster)
"""
"""Addresses of the window's known pods and services (the pod and service ranges are inferred from them)."""


def _known_addresses(engine: Engine, since: datetime, until: datetime, cluster: str | None) -> list[str]:
    params = {"since": since, "until": until, "cluster": cluster}
    table = engine.run(_KNOWN_ADDRESSES_SQL, params, question="addresses of known pods and services")
    return [str(v) for v in table.column("ip").to_pylist() if v]


def _span(rows: Sequence[Mapping[str, Any]]) -> tuple[datetime, datetime] | None:
    firsts = [r["first_seen"] for r in rows if r.get("first_seen") is not None]
    lasts = [r["last_seen"] for r in rows if r.get("last_seen") is not None]
    return (min(firsts), max(lasts)) if firsts and lasts else None


def split_denied(
    rows: Iterable[dict[str, Any]], *, learn_from_drops: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The edges to learn from, and those denied by the current policy (`status = 'denied'`: an end reported a
    policy drop for the connection), which are never learned unless `learn_from_drops`. Rows without a
    status are delivered."""
    learn, denied = [], []
    for row in rows:
        (denied if row.get("status") == "denied" and not learn_from_drops else learn).append(row)
    return learn, denied


def _pod_ends(row: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(side, namespace, workload) of each end of a row that is a pod."""
    ends = []
    for side in ("source", "destination"):
        namespace = endpoint_namespace(row, side)
        if namespace is not None:
            ends.append((side, namespace, str(row.get(f"{side}_workload") or "")))
    return ends


def _invalid_names(rows: Sequence[Mapping[str, Any]]) -> dict[int, LeftOut]:
    """Rows with an end whose namespace or workload Kubernetes would never accept (not DNS-1123), left out."""
    out = {}
    for index, row in enumerate(rows):
        for _, namespace, workload in _pod_ends(row):
            bad = [n for n, ok in ((namespace, valid_name(namespace)),
                                   (workload, not workload or valid_name(workload, subdomain=True))) if not ok]  # fmt: skip
            if bad:
                out[index] = LeftOut(
                    edge_text(row),
                    None,
                    f"{', '.join(repr(b) for b in bad)} is not a name Kubernetes accepts (DNS-1123)",
                    "check where these flows came from: no policy is written for a name the cluster cannot have",
                    int(row.get("flows") or 0),
                    _ends(row),
                    kind="invalid name",
                )
                break
    return out


def _ends(row: Mapping[str, Any]) -> tuple[Subject, ...]:
    """Both pod ends of an edge as proof subjects: the drafts deny the edge there, as expected."""
    protocol = row.get("l4_protocol")
    port = row.get("destination_port") if protocol in ("TCP", "UDP", "SCTP") else row.get("icmp_type")
    return tuple(
        (f"{ns}/{wl}", "egress" if side == "source" else "ingress", protocol, port)
        for side, ns, wl in _pod_ends(row)
    )


def _denied(row: Mapping[str, Any]) -> LeftOut:
    """An edge an end reported denied by policy: kept denied, and denied as expected by the drafts."""
    ends = _pod_ends(row)
    namespace = next((ns for side, ns, _ in ends if side == "destination"), ends[0][1] if ends else None)
    if row.get("destination_port") == DNS_PORT and row.get("l4_protocol") in ("UDP", "TCP"):
        return LeftOut(
            edge_text(row),
            namespace,
            "denied by your current policy: DNS lookups, which the drafted default-deny's DNS allowance allows "
            "(a default-deny needs it; today's policy blocks the lookups, see the unexpected_drops question)",
            "check why the current policy blocks DNS; the drafts do not keep it blocked",
            int(row.get("flows") or 0),
            (),
            kind="denied",
        )
    return LeftOut(
        edge_text(row),
        namespace,
        "denied by your current policy",
        "nothing: it stays denied (--learn-from-drops learns it)",
        int(row.get("flows") or 0),
        _ends(row),
        kind="denied",
    )


# -- proving ------------------------------------------------------------------------------------------------


def _prove(
    draft: Draft,
    fmt: Format,
    rows: Sequence[Mapping[str, Any]],
    learned: list[dict[str, Any]],
    existing: Sequence[Policy],
    stored: StoredEdges | None,
    config: SuggestConfig,
    suggestion: Suggestion,
    kept_denied: set[Subject],
) -> tuple[FormatResult, list[DraftFile]]:
    """Render the draft, read the written text back, replay through it, and withhold the namespaces whose drafts
    would deny a request nothing explains (listed as left out); the result and its files."""
    # NetworkPolicy names node addresses only by ipBlock, which Cilium applies to nodes in the `nodes` mode.
    nodes = fmt == "kubernetes" and any("policy-cidr-match-mode: nodes" in n for n in draft.notes)
    expected = {s for lo in draft.left_out for s in lo.subjects} | kept_denied
    policies = list(draft.policies)
    left_out = list(draft.left_out)
    withheld: set[str] = set()
    # Each policy rendered once, and each file's rendered policies, kept while the same policies go to it (by
    # identity: `draft` holds them all alive, so an identity is never reused here).
    rendered: dict[int, Rendered] = {}
    bodies: dict[str, _Body] = {}

    def render(policy: Policy) -> Rendered:
        found = rendered.get(id(policy))
        if found is None:
            found = rendered[id(policy)] = render_parts(policy, window=suggestion.window)
        return found

    while True:
        result = FormatResult(fmt, policies, notes=list(draft.notes), review=_world_ingress(policies))
        result.notes += sorted({f"{p.key}: {n}" for p in policies for n in render(p).notes})
        result.left_out = left_out
        files = _files(result, config, suggestion, bodies, render)
        # The exact text that is written, read back: what the cluster would get is what is proved.
        documents = {f.path: _read_documents(f, bodies.get(f.path)) for f in files}
        deployed = [p for f in files for p in _read_back(f, documents[f.path])]
        proof = prove_draft(deployed, learned, flavour=fmt, existing=existing, stored=stored,
                            cidr_match_nodes=nodes, left_out=expected)  # fmt: skip
        broken = [(e, False) for e in proof.broken] + [(e, True) for e in proof.broken_stored]
        if not broken:
            break
        # Withhold the drafts of every namespace that denies what nothing explains, then prove the rest again.
        blamed = {s[0].split("/", 1)[0] for e, _ in broken for s in subjects(e) if s not in expected
                  and "/" in s[0]} - withheld  # fmt: skip
        if not blamed:  # nothing left to withhold (the existing policies deny it): list it and stop
            left_out = left_out + [_not_proved(e, None, in_stored) for e, in_stored in broken]
            break
        withheld |= blamed
        left_out = left_out + [
            _not_proved(e, ns, in_stored)
            for e, in_stored in broken
            for ns in sorted({s[0].split("/", 1)[0] for s in subjects(e)} & blamed)
        ]
        policies = [p for p in policies if p.namespace not in withheld]
    proved = {path: [d for d in docs if d is not None] for path, docs in documents.items()}
    proved_bodies = {path: bodies[path].text for path in documents}  # the very texts read back and proved
    result.left_out = left_out + [_unexpressible(e) for e in proof.unexpressible]
    result.requires = proof.requires
    result.requests_proved, result.flows_proved = proof.requests, proof.flows
    result.covered = _covered(rows, result, withheld)
    for edge in proof.learned_denied:
        for namespace in {s[0].split("/", 1)[0] for s in subjects(edge) if "/" in s[0]}:
            result.denied[namespace] = result.denied.get(namespace, 0) + edge.flows
    files = _files(result, config, suggestion, bodies, render)  # the headers now name everything left out
    for draft_file in files:
        body = proved_bodies.get(draft_file.path)
        if body is not None and draft_file.text.endswith(body) and _comments(draft_file.text[: -len(body)]):
            continue  # the text proved, with other comment lines above it: the same documents
        if [d for d in _documents(draft_file.text) if d is not None] != proved.get(draft_file.path):
            raise PolicyError(f"the written text of {draft_file.path} differs from the proved documents")
    return result, files


def _read_back(draft_file: DraftFile, documents: Sequence[Any]) -> list[Policy]:
    """The policies of a file as the cluster would read its text (`documents`, read from it): exactly as many
    as were drafted."""
    policies = policies_of(enumerate(documents), path=draft_file.path)
    if len(policies) != draft_file.policies:
        raise PolicyError(
            f"{draft_file.path} reads back as {len(policies)} policies where {draft_file.policies} were drafted"
        )
    return policies


def _read_documents(draft_file: DraftFile, body: _Body | None) -> list[Any]:
    """Every document of a drafted file's text, as the cluster would read it.

    The text is parsed, unless it is whole comment lines above a body whose every document the fast path wrote
    (`Rendered.exact`: its output reads back as the very documents it was given, so parsing it would only give
    them again); then they are those documents. A body PyYAML wrote any part of is always parsed.
    """
    if body is not None and body.documents is not None:
        text = body.text
        if draft_file.text.endswith(text) and _comments(draft_file.text[: -len(text)]):
            return list(body.documents)
    return _documents(draft_file.text)


def _comments(text: str) -> bool:
    """True when `text` is whole comment lines only: every line, split at any line break, starts with `#` and
    holds printable characters only (nothing a YAML reader refuses, and nothing it could take as a line break)."""
    return text.endswith("\n") and all(
        line.startswith("#") and line.isprintable() for line in text.splitlines()
    )


def _documents(text: str) -> list[Any]:
    """Every document of a drafted file's text (None for an empty one)."""
    try:
        return load_documents(text, path="<draft>")
    except PolicyParseError as exc:
        raise PolicyParseError(f"a drafted file does not parse back: {exc}", path="<draft>") from exc


def _not_proved(edge: DeniedEdge, namespace: str | None, stored: bool) -> LeftOut:
    what = "stored flows of the window" if stored else "requests the drafts were learned from"
    return LeftOut(
        denied_text(edge),
        namespace,
        f"the replay of the {what} denies it ({edge.reason}), so the drafts of namespace {namespace} are not "
        "offered"
        if namespace
        else f"the replay of the {what} denies it ({edge.reason})",
        "allow it in a policy of your own, or draft the namespace again with --namespace and a narrower window",
        edge.flows,
        kind="not proved",
    )


def _unexpressible(edge: DeniedEdge) -> LeftOut:
    namespace = next((s[0].split("/", 1)[0] for s in subjects(edge) if "/" in s[0]), None)
    return LeftOut(
        denied_text(edge),
        namespace,
        f"a NetworkPolicy cannot allow {edge.protocol} alone",
        "allow it with a CiliumNetworkPolicy (--format cilium)",
        edge.flows,
        kind="cannot be expressed",
    )


def _covered(rows: Sequence[Mapping[str, Any]], result: FormatResult, withheld: set[str]) -> dict[str, int]:
    """Learned requests the drafts allow, per drafted namespace (as client or server)."""
    left = {lo.edge for lo in result.left_out}
    drafted = {p.namespace for p in result.policies if p.namespace} - withheld
    covered: dict[str, int] = defaultdict(int)
    for row in rows:
        if edge_text(row) in left:
            continue
        for namespace in {ns for _, ns, _ in _pod_ends(row)} & drafted:
            covered[namespace] += int(row.get("flows") or 0)
    return dict(covered)


def _world_ingress(policies: Iterable[Policy]) -> list[str]:
    """Ingress from the world that a draft allows because it was seen: right for an ingress controller,
    worth a look anywhere else (a rule too broad in today's policies lets it through)."""
    found = []
    for policy in policies:
        for rule in policy.rules_for("ingress"):
            if any(p.kind == "entity" and p.entity in ("world", "all") for p in rule.peers):
                ports = (
                    ", ".join(f"{p.protocol}/{p.port}" for pr in rule.ports for p in pr.ports) or "every port"
                )
                found.append(f"{policy.key} accepts ingress from the world on {ports} "
                             f"({rule.flows or 0} requests were forwarded): keep it only if it is meant to")  # fmt: skip
    return found


# -- existing policies --------------------------------------------------------------------------------------


def _additions(
    rows: list[dict[str, Any]],
    learned: list[dict[str, Any]],
    existing: list[Policy],
    fmt: Format,
    config: SuggestConfig,
    suggestion: Suggestion,
    ranges: Sequence[Network],
) -> Draft:
    """The minimal policies to add to `existing` so that every learned request is allowed."""
    sides = denied_directions(existing, learned)
    needed = [i for i, s in enumerate(sides) if s]
    if config.namespaces:
        wanted = set(config.namespaces)
        needed = [
            i for i in needed
            if any(endpoint_namespace(rows[i], "source" if d == "egress" else "destination") in wanted
                   for d in sides[i])
        ]  # fmt: skip
    new_edges = sorted({edge_text(rows[i], sides[i]) for i in needed})
    suggestion.new_edges = sorted(set(suggestion.new_edges) | set(new_edges))
    draft = draft_policies(
        [rows[i] for i in needed],
        flavour=_flavour(fmt),
        namespaces=config.namespaces or None,
        l7=config.l7,
        include_kube_system=True,  # the existing policies already isolate these pods, wherever they are
        default_deny=False,
        context=rows,
        sides=[sides[i] for i in needed],
        cluster_ranges=ranges,
    )
    taken = {p.key for p in existing}
    additions = []
    for policy in draft.policies:
        name, suffix = policy.name, 2
        while f"{policy.namespace}/{name}" in taken:
            name, suffix = f"{policy.name}-{suffix}", suffix + 1
        taken.add(f"{policy.namespace}/{name}")
        # Additive only: Cilium drafts switch default deny off; a NetworkPolicy isolates its own directions,
        # which the existing policies already isolate for these pods (the replay below proves it).
        isolates = () if fmt == "cilium" else tuple(d for d in DIRECTIONS if policy.rules_for(d))
        additions.append(dataclasses.replace(policy, name=name, isolates=isolates))
    return Draft(additions, draft.notes, draft.left_out)


# -- Istio --------------------------------------------------------------------------------------------------


def _istio(
    rows: list[dict[str, Any]], config: SuggestConfig, suggestion: Suggestion
) -> tuple[FormatResult, list[DraftFile]]:
    draft = draft_authorization_policies(
        rows,
        namespaces=config.namespaces or None,
        l7=config.l7,
        include_kube_system=config.include_kube_system,
        istio_version=config.istio_version,
    )
    policies = list(draft.policies)
    # What the format cannot express, named by the draft: left out with its reason.
    left_out = [
        LeftOut(
            edge_text(rows[i]),
            endpoint_namespace(rows[i], "destination"),
            why,
            "allow it with a CiliumNetworkPolicy (--format cilium)",
            int(rows[i].get("flows") or 0),
        )
        for i, why in sorted(draft.left_out.items())
    ]
    learned = [r for i, r in enumerate(rows) if i not in draft.left_out]
    refused = unallowed_requests(policies, learned, istio_version=config.istio_version)
    if refused:
        # The server's namespace is withheld, the rest offered.
        withheld = {str(endpoint_namespace(r, "destination")) for r in refused}
        policies = [p for p in policies if p.namespace not in withheld]
        left_out += [
            LeftOut(
                edge_text(r),
                endpoint_namespace(r, "destination"),
                "the AuthorizationPolicy drafted for its server would refuse it, so the drafts of that "
                "namespace are not offered",
                "allow it in a policy of your own",
                int(r.get("flows") or 0),
                kind="not proved",
            )
            for r in refused
        ]
    review = open_rules(policies) + [f"{w} (wider than the traffic)" for w in draft.wider]
    result = FormatResult("istio", policies, notes=list(draft.notes), review=review, left_out=left_out)
    left = {lo.edge for lo in left_out}
    result.requests_proved = sum(int(r["flows"] or 0) for r in learned if edge_text(r) not in left)
    result.requires.append("Istio with mutual TLS (principals come from client certificates)")
    result.requires += list(ASSUMPTIONS)
    result.covered = _covered(rows, result, set())
    files = _files(result, config, suggestion)
    for draft_file in files:
        if sum(d is not None for d in _documents(draft_file.text)) != draft_file.policies:
            raise PolicyError(f"{draft_file.path} reads back as other documents than were drafted")
    return result, files


# -- files --------------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    """A safe file name stem for `name`: lower-case letters, digits, `.`, `-` and `_`, never `.`/`..`, at most
    `MAX_FILE_STEM` characters (a longer or rewritten name gets a hash of the whole name, so stems stay unique)."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip(".-") or "unnamed"
    if stem == name and len(stem) <= MAX_FILE_STEM:
        return stem
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{stem[: MAX_FILE_STEM - 11].rstrip('.-')}-{digest}"


def _unique_paths(files: list[DraftFile]) -> None:
    """Two files never share a path (case-insensitive file systems included)."""
    seen: set[str] = set()
    for i, draft_file in enumerate(files):
        path, n = draft_file.path, 2
        while path.lower() in seen:
            stem = draft_file.path.removesuffix(".yaml")
            path, n = f"{stem}-{n}.yaml", n + 1
        seen.add(path.lower())
        if path != draft_file.path:
            files[i] = dataclasses.replace(draft_file, path=path)


@dataclass(frozen=True, slots=True)
class _Body:
    """The rendered policies of one file: the policies (by identity), their text, and their documents when the
    fast path wrote every one of them (None: parse the text)."""

    policies: tuple[int, ...]
    text: str
    documents: tuple[dict[str, Any], ...] | None


def _files(
    result: FormatResult,
    config: SuggestConfig,
    suggestion: Suggestion,
    bodies: dict[str, _Body] | None = None,
    render: Callable[[Policy], Rendered] | None = None,
) -> list[DraftFile]:
    """The files of a format's policies. `bodies`: each path's rendered policies, reused while the same
    policies go to the same path (only the file headers change between proof rounds). `render`: how a policy
    is rendered (each one once, by the caller; default: `render_parts`)."""
    bodies = {} if bodies is None else bodies
    if render is None:
        window = suggestion.window

        def render(policy: Policy) -> Rendered:
            return render_parts(policy, window=window)

    prefix = f"{result.format}/" if len(config.formats) > 1 else ""
    groups: dict[tuple[str, str], list[Any]] = {}
    for policy in result.policies:
        namespace = policy.namespace or "_cluster"
        name = (
            f"{_slug(namespace)}/{_slug(policy.name)}.yaml"
            if config.per_workload
            else f"{_slug(namespace)}.yaml"
        )
        groups.setdefault((namespace, prefix + name), []).append(policy)
    files = []
    for (namespace, path), policies in groups.items():
        same = tuple(map(id, policies))
        known = bodies.get(path)
        if known is None or known.policies != same:
            if result.format == "istio":
                known = _Body(same, render_istio(policies, window=suggestion.window), None)
            else:
                parts = [render(p) for p in policies]
                exact = all(r.exact for r in parts)
                text = "---\n".join(r.text for r in parts)  # as `render_yaml` writes them
                known = _Body(same, text, tuple(r.document for r in parts) if exact else None)
            bodies[path] = known
        body = known.text
        header = _file_header(result, namespace, policies, config, suggestion, render)
        rules = sum(_rule_count(p) for p in policies)
        files.append(DraftFile(path, result.format, namespace, header + body, len(policies), rules))
    return files


def _file_header(
    result: FormatResult,
    namespace: str,
    policies: Sequence[Any],
    config: SuggestConfig,
    suggestion: Suggestion,
    render: Callable[[Policy], Rendered],
) -> str:
    kind = KINDS[result.format]
    lines = [f"flowpipe suggest: {kind} drafts for namespace {namespace}{_of_cluster(suggestion.cluster)}"]
    if suggestion.existing_policies is not None:
        lines.append(
            f"additions to the existing policies ({', '.join(config.existing)}): only what they would deny"
        )
    span = ""
    if suggestion.window is not None:
        span = f", observed {_time(suggestion.window[0])} .. {_time(suggestion.window[1])}"
    lines.append(f"learned from {suggestion.requests:,} requests in {suggestion.edges:,} edges{span}")
    left_out = [lo for lo in result.left_out if lo.namespace == namespace]
    lines.append("replayed before they were offered: they allow every request they were learned from"
                 + (", except the edges left out below" if left_out else ""))  # fmt: skip
    lines += [f"requires: {r}" for r in result.requires]
    lines += [f"left out: {lo.edge}: {lo.reason}; what to do: {lo.action}" for lo in left_out]
    lines += [f"review: {r}" for r in result.review if r.startswith(f"{namespace}/")]
    notes = sorted({c for p in policies for c in p.comments} | {
        n for p in policies if isinstance(p, Policy) for n in render(p).notes})  # fmt: skip
    lines += [f"note: {n}" for n in notes]
    lines.append("review before applying: flowpipe never applies anything")
    return comment_block(lines)


def _flavour(fmt: Format) -> Flavour:
    return "kubernetes" if fmt == "kubernetes" else "cilium"


def _rule_count(policy: Policy | IstioPolicy) -> int:
    if isinstance(policy, IstioPolicy):
        return len(policy.document.get("spec", {}).get("rules") or ())
    return sum(1 for r in policy.rules if not r.allows_nothing)


def _time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _of_cluster(cluster: str | None) -> str:
    return f" of cluster {cluster}" if cluster is not None else ""
