"""Draft policies from the dataset: a window's observed edges → drafts → replay proof → rendered files and summary.

`suggest_policies(engine, SuggestConfig(...))` runs the `observed_edges` question over a window, drafts the
policies of each requested format (`cilium`, `kubernetes`, `istio`), and proves each draft before offering it:

- `flowpipe.policy.proof.prove_draft` parses the rendered documents back (what the cluster would get) and
  replays the requests they were learned from through them (for Istio, `istio.unallowed_requests`); with
  `verify_flows`, the stored flows of the window too. A draft that would deny any of them is refused with
  `DraftRefusedError`, naming the edges. Requests a format cannot express at all (ICMP in a NetworkPolicy)
  are not a refusal: they are named in the files' headers and the summary.
- With `existing` (paths of the user's current policies), only what is new is drafted: the learned requests
  the existing policies would deny are found by replaying them (per direction), and minimal additional
  policies allow exactly those. They add allows and nothing else (Cilium drafts set `enableDefaultDeny:
  false`; a NetworkPolicy isolates only the directions of its rules, which the existing set isolates already
  for those pods), never reuse the name of an existing policy, and the proof replays the existing set plus
  the additions.

Policies apply to one cluster, so drafts are learned from the flows of one cluster: `cluster` (`--cluster`), or
the only one the window holds; a window with flows of several clusters and no `cluster` is refused with the
clusters found (`flowpipe.policy.clusters.choose_cluster`). The proof replays that cluster's stored flows only.

The output is deterministic: the same dataset and options give byte-identical files. File headers carry the
observed span of the learned flows (first and last), not the window asked for, which moves with the clock.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from flowpipe.errors import ConfigError, PolicyError
from flowpipe.policy.clusters import choose_cluster
from flowpipe.policy.draft import Draft, draft_policies
from flowpipe.policy.edges import learned_requests
from flowpipe.policy.istio import IstioPolicy, draft_authorization_policies, render_istio, unallowed_requests
from flowpipe.policy.load import load_policies
from flowpipe.policy.model import DIRECTIONS, Flavour, Policy
from flowpipe.policy.proof import MAX_NAMED_EDGES, StoredEdges, prove_draft, refusal
from flowpipe.policy.render import render_yaml, unexpressed
from flowpipe.policy.replay import denied_directions
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
_L4 = ("TCP", "UDP", "SCTP")


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
        default=False, metadata={"help": "Also learn policy-denied drops (clusters already in default-deny)."}
    )
    per_workload: bool = field(default=False, metadata={"help": "One file per workload, not per namespace."})
    include_kube_system: bool = field(default=False, metadata={"help": "Draft kube-system too."})
    existing: tuple[str, ...] = field(
        default=(), metadata={"help": "Current policy files or folders: draft only what is new against them."}
    )
    verify_flows: bool = field(
        default=True, metadata={"help": "Also replay the window's stored flows through each draft."}
    )

    def __post_init__(self) -> None:
        if not self.formats:
            raise ConfigError("choose at least one format (cilium, kubernetes, istio)")
        unknown = [f for f in self.formats if f not in KINDS]
        if unknown:
            raise ConfigError(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
        if self.existing and "istio" in self.formats:
            raise ConfigError("--existing compares with Kubernetes and Cilium policies; use --format cilium, "
                              "kubernetes or both")  # fmt: skip


@dataclass(frozen=True, slots=True)
class DraftFile:
    """One output file: its path relative to the output folder, and its text."""

    path: str
    format: Format
    namespace: str
    text: str
    policies: int
    rules: int


@dataclass(slots=True)
class FormatResult:
    """The proved draft of one format."""

    format: Format
    policies: list[Policy] | list[IstioPolicy]
    notes: list[str] = field(default_factory=list)
    not_allowed: list[str] = field(default_factory=list)
    """Learned requests this format cannot allow (e.g. ICMP in a NetworkPolicy), named, never silent."""
    requires: list[str] = field(default_factory=list)
    """Cluster settings the draft relies on."""
    review: list[str] = field(default_factory=list)
    """Rules worth a second look although the traffic was forwarded (ingress from the world)."""
    requests_proved: int = 0
    flows_proved: int | None = None

    @property
    def rules(self) -> int:
        """Rules over all policies (Istio: rules of the AuthorizationPolicies)."""
        return sum(_rule_count(p) for p in self.policies)


@dataclass(slots=True)
class Suggestion:
    """What `suggest_policies` drafted, from which window, and the files to write."""

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

    def stream(self) -> str:
        """Every file as one multi-document YAML stream (what `suggest` prints without `--out`)."""
        return "---\n".join(f.text for f in self.files)

    def summary(self) -> list[str]:
        """Lines for people: what was learned, drafted and proved, and what could not be expressed."""
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
                lines += [f"  {edge}" for edge in self.new_edges[:MAX_NAMED_EDGES]]
                if len(self.new_edges) > MAX_NAMED_EDGES:
                    lines.append(f"  ... and {len(self.new_edges) - MAX_NAMED_EDGES} more")
        for result in self.results:
            files = [f for f in self.files if f.format == result.format]
            deny = sum(1 for p in result.policies if p.name == "flowpipe-default-deny")
            proof = f"replay allows all {result.requests_proved:,} learned requests"
            if result.flows_proved is not None:
                proof += f" and {result.flows_proved:,} stored requests"
            lines.append(
                f"{result.format}: {len(result.policies)} {KINDS[result.format]} documents ({deny} default-deny), "
                f"{result.rules} rules in {len(files)} files; {proof}"
            )
            lines += [f"  requires: {r}" for r in result.requires]
            lines += [f"  review: {r}" for r in result.review]
            lines += [f"  not allowed (cannot be expressed): {e}" for e in result.not_allowed]
            lines += [f"  note: {n}" for n in result.notes]
        return lines


def suggest_policies(engine: Engine, config: SuggestConfig, *, now: datetime | None = None) -> Suggestion:
    """Draft, prove and render the policies the window's traffic needs (see the module doc).

    >>> with open_engine("flowpipe-data") as engine:                       # doctest: +SKIP
    ...     suggestion = suggest_policies(engine, SuggestConfig(since="7d", formats=("cilium",)))
    >>> write_files(suggestion, Path("drafts"))                            # doctest: +SKIP

    Raises `PolicyError` when the window holds no request to learn from, `DraftRefusedError` when a draft's
    replay denies requests it was built from, `PolicyParseError` for unreadable `existing` files, and
    `ConfigError` when the window holds flows of several clusters and `config.cluster` names none of them.
    """
    rows, since, until, anchored_to, cluster = _observed_edges(engine, config, now)
    if not rows:
        raise PolicyError(
            f"no requests to learn from between {window_bound(since)} and {window_bound(until)}"
            + _of_cluster(cluster)
            + (f" touching {', '.join(config.namespaces)}" if config.namespaces else "")
            + ": widen --since (--since all: every stored flow), check --namespace, or add --learn-from-drops for "
            "a cluster in default-deny"
        )
    window = _span(rows)
    suggestion = Suggestion(
        since, until, anchored_to, window, len(rows), sum(int(r["flows"] or 0) for r in rows), cluster=cluster
    )
    learned = learned_requests(rows)
    stored = StoredEdges(engine, since, until, cluster) if config.verify_flows else None
    existing: list[Policy] | None = None
    if config.existing:
        existing = load_policies(config.existing)
        suggestion.existing_policies = len(existing)
    for fmt in config.formats:
        if fmt == "istio":
            result = _istio(rows, config)
        elif existing is not None:
            result = _additions(rows, learned, existing, fmt, config, suggestion, stored)
        else:
            draft = draft_policies(
                rows,
                flavour=_flavour(fmt),
                namespaces=config.namespaces or None,
                l7=config.l7,
                include_kube_system=config.include_kube_system,
            )
            result = _prove(draft, fmt, learned, [], stored)
        suggestion.results.append(result)
        suggestion.files += _files(result, config, suggestion)
    return suggestion


def write_files(suggestion: Suggestion, out: Path) -> list[Path]:
    """Write the suggestion's files under `out` (created if needed), each whole or not at all."""
    written = []
    for draft_file in suggestion.files:
        path = out / draft_file.path
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(draft_file.text, encoding="utf-8")
        os.replace(temporary, path)
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
        rows = [r for r in rows if r["source_namespace"] in wanted or r["destination_namespace"] in wanted]
    return rows, since, until, anchored_to, cluster


def _span(rows: Sequence[Mapping[str, Any]]) -> tuple[datetime, datetime] | None:
    firsts = [r["first_seen"] for r in rows if r.get("first_seen") is not None]
    lasts = [r["last_seen"] for r in rows if r.get("last_seen") is not None]
    return (min(firsts), max(lasts)) if firsts and lasts else None


# -- proving ------------------------------------------------------------------------------------------------


def _prove(
    draft: Draft, fmt: Format, learned: list[dict[str, Any]], existing: Sequence[Policy], stored: StoredEdges | None
) -> FormatResult:  # fmt: skip
    """The format's result once its draft is proved (`prove_draft` raises `DraftRefusedError` otherwise)."""
    # NetworkPolicy names node addresses only by ipBlock, which Cilium applies to nodes in the `nodes` mode.
    nodes = fmt == "kubernetes" and any("policy-cidr-match-mode: nodes" in n for n in draft.notes)
    proof = prove_draft(draft.policies, learned, existing=existing, stored=stored, cidr_match_nodes=nodes)
    result = FormatResult(
        fmt, list(draft.policies), notes=list(draft.notes), review=_world_ingress(draft.policies)
    )
    result.notes += sorted({f"{p.key}: {n}" for p in draft.policies for n in unexpressed(p)})
    result.not_allowed, result.requires = proof.not_allowed, proof.requires
    result.requests_proved, result.flows_proved = proof.requests, proof.flows
    return result


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
    stored: StoredEdges | None,
) -> FormatResult:
    """The minimal policies to add to `existing` so that every learned request is allowed."""
    sides = denied_directions(existing, learned)
    needed = [i for i, s in enumerate(sides) if s]
    if config.namespaces:
        wanted = set(config.namespaces)
        needed = [
            i for i in needed
            if any(rows[i][f"{'source' if d == 'egress' else 'destination'}_namespace"] in wanted for d in sides[i])
        ]  # fmt: skip
    new_edges = sorted({_row_text(rows[i], sides[i]) for i in needed})
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
    return _prove(Draft(additions, draft.notes), fmt, learned, existing, stored)


def _row_text(row: Mapping[str, Any], sides: Sequence[str]) -> str:
    def end(side: str) -> str:
        if row.get(f"{side}_entity") is None:
            return f"{row.get(f'{side}_namespace')}/{row.get(f'{side}_workload')}"
        names = row.get(f"{side}_names") or ()
        address = names[0] if names else row.get(f"{side}_ip")
        return f"{row[f'{side}_entity']}:{address}" if address else str(row[f"{side}_entity"])

    protocol = row.get("l4_protocol") or "?"
    port = row.get("destination_port") if protocol in _L4 else row.get("icmp_type")
    l7 = ""
    if row.get("l7_protocol") == "http":
        l7 = f" {row.get('http_method')} {row.get('http_path')}"
    elif row.get("l7_protocol") == "kafka":
        l7 = f" kafka {row.get('kafka_role')} {row.get('kafka_topic') or ''}".rstrip()
    where = "+".join(sides)
    return f"{end('source')} -> {end('destination')} {protocol}/{port}{l7} (denied at {where})"


# -- Istio --------------------------------------------------------------------------------------------------


def _istio(rows: list[dict[str, Any]], config: SuggestConfig) -> FormatResult:
    draft = draft_authorization_policies(
        rows,
        namespaces=config.namespaces or None,
        l7=config.l7,
        include_kube_system=config.include_kube_system,
    )
    refused = unallowed_requests(draft.policies, rows)
    if refused:
        names = [_row_text(r, ("ingress",)) for r in refused]
        raise refusal(
            "istio", "the requests it was learned from", names, sum(int(r["flows"] or 0) for r in refused)
        )
    review = [
        f"{p.key} accepts calls from any source (the world was seen calling it) on ports "
        f"{', '.join(sorted({port for op in rule['to'] for port in op['operation'].get('ports', ())}))}: "
        "keep it only if it is meant to"
        for p in draft.policies
        for rule in p.document["spec"].get("rules", ())
        if "from" not in rule
    ]
    result = FormatResult("istio", list(draft.policies), notes=list(draft.notes), review=review)
    result.requests_proved = sum(int(r["flows"] or 0) for r in rows)
    result.requires.append("Istio with mutual TLS (principals come from client certificates)")
    return result


# -- files --------------------------------------------------------------------------------------------------


def _files(result: FormatResult, config: SuggestConfig, suggestion: Suggestion) -> list[DraftFile]:
    prefix = f"{result.format}/" if len(config.formats) > 1 else ""
    groups: dict[tuple[str, str], list[Any]] = {}
    for policy in result.policies:
        namespace = policy.namespace or "_cluster"
        name = f"{namespace}/{policy.name}.yaml" if config.per_workload else f"{namespace}.yaml"
        groups.setdefault((namespace, prefix + name), []).append(policy)
    files = []
    for (namespace, path), policies in groups.items():
        if result.format == "istio":
            body = render_istio(policies, window=suggestion.window)
        else:
            body = render_yaml(policies, window=suggestion.window)
        header = _file_header(result, namespace, policies, config, suggestion)
        rules = sum(_rule_count(p) for p in policies)
        files.append(DraftFile(path, result.format, namespace, header + body, len(policies), rules))
    return files


def _file_header(
    result: FormatResult, namespace: str, policies: Sequence[Any], config: SuggestConfig, suggestion: Suggestion
) -> str:  # fmt: skip
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
    marker = f"{namespace}/"
    not_allowed = [e for e in result.not_allowed if marker in e]
    lines.append("replayed before they were offered: they allow every request they were learned from"
                 + (", except those named below" if not_allowed else ""))  # fmt: skip
    lines += [f"requires: {r}" for r in result.requires]
    lines += [f"not allowed (cannot be expressed): {e}" for e in not_allowed]
    lines += [f"review: {r}" for r in result.review if r.startswith(marker)]
    notes = sorted({c for p in policies for c in p.comments} | {
        n for p in policies if isinstance(p, Policy) for n in unexpressed(p)})  # fmt: skip
    lines += [f"note: {n}" for n in notes]
    lines.append("review before applying: flowpipe never applies anything")
    return "".join(f"# {line}\n" for line in lines)


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
