"""FlowFilter matching with Hubble's semantics: whitelist OR, blacklist OR, AND inside one filter.

A filter is compiled once per request. Checks that only need the fields the buffer keeps beside each flow's
bytes (node, verdict, namespaces) run without decoding; the others decode the flow once, on demand.
Invalid filters (bad IP, regexp, selector, port, protocol) raise `ConfigError`, which the server answers
with INVALID_ARGUMENT.
"""

from __future__ import annotations

import ipaddress
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from flowpipe._proto.flow import flow_pb2
from flowpipe.errors import ConfigError
from flowpipe.server.selectors import parse_label_selector, selector_matches


class FlowRecord(Protocol):
    """What a filter needs from a stored flow: the cached fields and a way to decode the whole flow."""

    node_name: str
    verdict: int
    source_namespace: str
    destination_namespace: str

    def parse(self) -> flow_pb2.Flow: ...


RecordCheck = Callable[[FlowRecord], bool]
FlowCheck = Callable[[flow_pb2.Flow], bool]


class MessageRecord:
    """A FlowRecord around an already decoded `flow.Flow`."""

    __slots__ = ("destination_namespace", "flow", "node_name", "source_namespace", "verdict")

    def __init__(self, flow: flow_pb2.Flow) -> None:
        self.flow = flow
        self.node_name = flow.node_name
        self.verdict = int(flow.verdict)
        self.source_namespace = flow.source.namespace
        self.destination_namespace = flow.destination.namespace

    def parse(self) -> flow_pb2.Flow:
        """The wrapped flow."""
        return self.flow


# -- small parsers ------------------------------------------------------------------------------------


def parse_pod_filter(text: str) -> tuple[str, str]:
    """`ns/prefix` → (ns, prefix); `ns/` → (ns, ""); `/prefix` → ("", prefix) any namespace; `prefix` → default."""
    if "/" in text:
        namespace, _, prefix = text.partition("/")
        return namespace, prefix
    return "default", text


def _pod_matcher(specs: list[tuple[str, str]]) -> Callable[[str, str], bool]:
    def match(namespace: str, name: str) -> bool:
        if not namespace and not name:
            return False
        for spec_ns, prefix in specs:
            if (not spec_ns or spec_ns == namespace) and name.startswith(prefix):
                return True
        return False

    return match


IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip_matcher(values: Sequence[str], where: str) -> Callable[[str], bool]:
    exact: set[str] = set()
    networks: list[IPNet] = []
    for value in values:
        try:
            if "/" in value:
                networks.append(ipaddress.ip_network(value, strict=False))
            else:
                exact.add(str(ipaddress.ip_address(value)))
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not an IP address or CIDR") from None

    def match(address: str) -> bool:
        if not address:
            return False
        if address in exact:
            return True
        if networks:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return False
            return any(ip.version == net.version and ip in net for net in networks)
        return False

    return match


def _glob_regex(pattern: str, star: str) -> str:
    return "".join(star if ch == "*" else re.escape(ch) for ch in pattern)


def _node_name_regex(pattern: str) -> re.Pattern[str]:
    # Patterns and names are compared as "<cluster>/<node>"; a pattern without a cluster matches any cluster.
    if "/" not in pattern:
        pattern = "*/" + pattern
    return re.compile(_glob_regex(pattern, "[^/]*"))


def qualified_node_name(name: str) -> str:
    """`cluster/node` form of a flow's node name (Hubble omits the cluster of the `default` cluster)."""
    return name if "/" in name else "default/" + name


def _fqdn_regex(pattern: str) -> re.Pattern[str]:
    pattern = pattern.lower().rstrip(".")
    if pattern == "*":
        return re.compile(".*")
    return re.compile(_glob_regex(pattern, "[-a-z0-9_]*"))


def _compile_regexes(values: Sequence[str], where: str) -> list[re.Pattern[str]]:
    out = []
    for value in values:
        try:
            out.append(re.compile(value))
        except re.error as exc:
            raise ConfigError(f"{where}: invalid regular expression {value!r}: {exc}") from None
    return out


def _parse_port(value: str, where: str) -> int:
    try:
        port = int(value, 10)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where}: {value!r} is not a port number (0-65535)")
    return port


def _labels_check(
    selectors: Sequence[str], where: str, get: Callable[[flow_pb2.Flow], Sequence[str]]
) -> FlowCheck:
    compiled = [parse_label_selector(s, where) for s in selectors]
    return lambda flow: any(selector_matches(reqs, get(flow)) for reqs in compiled)


# -- compiling one FlowFilter --------------------------------------------------------------------------

_PROTOCOLS: dict[str, Callable[[flow_pb2.Flow], bool]] = {
    "tcp": lambda f: f.l4.HasField("TCP"),
    "udp": lambda f: f.l4.HasField("UDP"),
    "sctp": lambda f: f.l4.HasField("SCTP"),
    "icmp": lambda f: f.l4.HasField("ICMPv4") or f.l4.HasField("ICMPv6"),
    "icmpv4": lambda f: f.l4.HasField("ICMPv4"),
    "icmpv6": lambda f: f.l4.HasField("ICMPv6"),
    "vrrp": lambda f: f.l4.HasField("VRRP"),
    "igmp": lambda f: f.l4.HasField("IGMP"),
    "dns": lambda f: f.l7.HasField("dns"),
    "http": lambda f: f.l7.HasField("http"),
    "kafka": lambda f: f.l7.HasField("kafka"),
}

_TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")


def _ports(flow: flow_pb2.Flow) -> tuple[int, int] | None:
    kind = flow.l4.WhichOneof("protocol")
    if kind in ("TCP", "UDP", "SCTP"):
        layer = getattr(flow.l4, kind)
        return layer.source_port, layer.destination_port
    return None


def _reply_value(flow: flow_pb2.Flow) -> bool | None:
    if flow.HasField("is_reply"):
        return bool(flow.is_reply.value)
    # Without is_reply, only a dropped flow counts (as not a reply), as Hubble does.
    return False if flow.verdict == flow_pb2.DROPPED else None


def _member(get: Callable[[flow_pb2.Flow], object], values: Iterable[object]) -> FlowCheck:
    allowed = frozenset(values)
    return lambda flow: get(flow) in allowed


@dataclass
class CompiledFilter:
    """One FlowFilter: node patterns (None = any), record-level checks and decoded-flow checks (all ANDed)."""

    node_patterns: list[re.Pattern[str]] | None = None
    record_checks: list[RecordCheck] = field(default_factory=list)
    flow_checks: list[FlowCheck] = field(default_factory=list)

    def node_matches(self, node_name: str) -> bool:
        """Whether this filter's node_name patterns (if any) accept the node."""
        if self.node_patterns is None:
            return True
        qualified = qualified_node_name(node_name)
        return any(p.fullmatch(qualified) for p in self.node_patterns)


def _compile_side(flt: flow_pb2.FlowFilter, side: str, where: str, out: CompiledFilter) -> None:
    """The `source_*` or `destination_*` fields of a filter (`side` is "source" or "destination")."""
    rec, fl = out.record_checks, out.flow_checks
    endpoint = operator.attrgetter(side)
    pods = getattr(flt, f"{side}_pod")
    if pods:
        specs = [parse_pod_filter(p) for p in pods]
        if all(ns and not prefix for ns, prefix in specs):
            namespaces = frozenset(ns for ns, _ in specs)  # namespace only: no decoding needed
            cached_namespace = operator.attrgetter(f"{side}_namespace")
            rec.append(lambda r: cached_namespace(r) in namespaces)
        else:
            pod_match = _pod_matcher(specs)
            fl.append(lambda f: pod_match(endpoint(f).namespace, endpoint(f).pod_name))
    services = getattr(flt, f"{side}_service")
    if services:
        service_match = _pod_matcher([parse_pod_filter(p) for p in services])
        service = operator.attrgetter(f"{side}_service")
        fl.append(lambda f: service_match(service(f).namespace, service(f).name))
    ips = getattr(flt, f"{side}_ip")
    if ips:
        ip_match = _ip_matcher(ips, f"{where}.{side}_ip")
        address = operator.attrgetter(f"IP.{side}")
        fl.append(lambda f: ip_match(address(f)))
    labels = getattr(flt, f"{side}_label")
    if labels:
        fl.append(_labels_check(labels, f"{where}.{side}_label", lambda f: endpoint(f).labels))
    fqdns = getattr(flt, f"{side}_fqdn")
    if fqdns:
        patterns = [_fqdn_regex(p) for p in fqdns]
        names = operator.attrgetter(f"{side}_names")
        fl.append(lambda f: any(p.fullmatch(n.lower().rstrip(".")) for n in names(f) for p in patterns))
    identities = getattr(flt, f"{side}_identity")
    if identities:
        fl.append(_member(lambda f: endpoint(f).identity, identities))
    workloads = getattr(flt, f"{side}_workload")
    if workloads:
        wanted = [(w.name, w.kind) for w in workloads]
        fl.append(
            lambda f: any(
                (not name or w.name == name) and (not kind or w.kind == kind)
                for w in endpoint(f).workloads
                for name, kind in wanted
            )
        )
    clusters = getattr(flt, f"{side}_cluster_name")
    if clusters:
        fl.append(_member(lambda f: endpoint(f).cluster_name, clusters))
    ports = getattr(flt, f"{side}_port")
    if ports:
        port_set = frozenset(_parse_port(p, f"{where}.{side}_port") for p in ports)
        index = 0 if side == "source" else 1
        fl.append(lambda f: (p := _ports(f)) is not None and p[index] in port_set)


def compile_filter(flt: flow_pb2.FlowFilter, where: str = "filter") -> CompiledFilter:
    """Compile one FlowFilter; raises ConfigError naming `where` and the field for invalid values."""
    out = CompiledFilter()
    rec, fl = out.record_checks, out.flow_checks

    if flt.node_name:
        out.node_patterns = [_node_name_regex(p) for p in flt.node_name]

    for side in ("source", "destination"):
        _compile_side(flt, side, where, out)

    if flt.verdict:
        verdicts = frozenset(flt.verdict)
        rec.append(lambda r: r.verdict in verdicts)
    if flt.event_type:
        wanted_types = [(e.type, e.match_sub_type, e.sub_type) for e in flt.event_type]
        fl.append(
            lambda f: any(
                (not t or f.event_type.type == t) and (not m or f.event_type.sub_type == s)
                for t, m, s in wanted_types
            )
        )
    if flt.protocol:
        checks = []
        for name in flt.protocol:
            check = _PROTOCOLS.get(name.lower())
            if check is None:
                raise ConfigError(
                    f"{where}.protocol: unknown protocol {name!r} (known: {', '.join(_PROTOCOLS)})"
                )
            checks.append(check)
        fl.append(lambda f: any(c(f) for c in checks))
    if flt.http_status_code:
        codes = []
        for code in flt.http_status_code:
            if not re.fullmatch(r"\d{1,3}\+?", code):
                raise ConfigError(f"{where}.http_status_code: {code!r} is not a status code like 404 or 5+")
            codes.append((code.rstrip("+"), code.endswith("+")))
        fl.append(
            lambda f: (
                f.l7.HasField("http")
                and f.l7.http.code != 0
                and any(
                    str(f.l7.http.code).startswith(c) if pre else str(f.l7.http.code) == c for c, pre in codes
                )
            )
        )
    if flt.http_method:
        methods = frozenset(m.upper() for m in flt.http_method)
        fl.append(lambda f: f.l7.HasField("http") and f.l7.http.method.upper() in methods)
    if flt.http_path:
        path_res = _compile_regexes(flt.http_path, f"{where}.http_path")
        fl.append(
            lambda f: f.l7.HasField("http") and any(r.search(urlsplit(f.l7.http.url).path) for r in path_res)
        )
    if flt.http_url:
        url_res = _compile_regexes(flt.http_url, f"{where}.http_url")
        fl.append(lambda f: f.l7.HasField("http") and any(r.search(f.l7.http.url) for r in url_res))
    if flt.http_header:
        headers = [(h.key, h.value) for h in flt.http_header]
        fl.append(
            lambda f: f.l7.HasField("http") and any((h.key, h.value) in headers for h in f.l7.http.headers)
        )
    if flt.dns_query:
        dns_res = _compile_regexes(flt.dns_query, f"{where}.dns_query")
        fl.append(lambda f: f.l7.HasField("dns") and any(r.search(f.l7.dns.query) for r in dns_res))
    if flt.reply:
        replies = frozenset(flt.reply)
        fl.append(lambda f: (v := _reply_value(f)) is not None and v in replies)
    if flt.uuid:
        fl.append(_member(lambda f: f.uuid, flt.uuid))
    if flt.trace_id:
        fl.append(_member(lambda f: f.trace_context.parent.trace_id, flt.trace_id))
    if flt.traffic_direction:
        fl.append(_member(lambda f: f.traffic_direction, flt.traffic_direction))
    if flt.drop_reason_desc:
        fl.append(_member(lambda f: f.drop_reason_desc, flt.drop_reason_desc))
    if flt.ip_version:
        versions = frozenset(flt.ip_version)
        fl.append(lambda f: f.HasField("IP") and f.IP.ipVersion in versions)
    if flt.tcp_flags:
        flag_sets = [[n for n in _TCP_FLAG_NAMES if getattr(t, n)] for t in flt.tcp_flags]
        fl.append(
            lambda f: (
                f.l4.HasField("TCP")
                and any(all(getattr(f.l4.TCP.flags, n) for n in names) for names in flag_sets)
            )
        )
    if flt.source_ip_xlated:
        xlated_match = _ip_matcher(flt.source_ip_xlated, f"{where}.source_ip_xlated")
        fl.append(lambda f: xlated_match(f.IP.source_xlated))
    if flt.interface:
        ifaces = [(i.index, i.name) for i in flt.interface]
        fl.append(
            lambda f: (
                f.HasField("interface")
                and any(
                    (not idx or f.interface.index == idx) and (not nm or f.interface.name == nm)
                    for idx, nm in ifaces
                )
            )
        )
    if flt.node_labels:
        fl.append(_labels_check(flt.node_labels, f"{where}.node_labels", lambda f: f.node_labels))
    if flt.ip_trace_id:
        trace_numbers = frozenset(flt.ip_trace_id)
        fl.append(lambda f: f.HasField("ip_trace_id") and f.ip_trace_id.trace_id in trace_numbers)
    if flt.encrypted:
        encrypted = frozenset(flt.encrypted)
        fl.append(lambda f: f.HasField("IP") and f.IP.encrypted in encrypted)
    if flt.HasField("experimental") and flt.experimental.cel_expression:
        raise ConfigError(
            f"{where}.experimental.cel_expression: CEL filters are not supported by this server"
        )
    return out


# -- whitelist / blacklist -----------------------------------------------------------------------------


class NodeMatcher:
    """The request's filters specialised to one node: call it with a FlowRecord of that node."""

    def __init__(
        self, whitelist: list[CompiledFilter], blacklist: list[CompiledFilter], any_whitelist: bool
    ) -> None:
        self._whitelist = [(f.record_checks, f.flow_checks) for f in whitelist]
        self._blacklist = [(f.record_checks, f.flow_checks) for f in blacklist]
        self._any_whitelist = any_whitelist
        unconditional = any(not r and not c for r, c in self._whitelist)
        self.accepts_all = not blacklist and (not any_whitelist or unconditional)

    def __call__(self, record: FlowRecord) -> bool:
        flow: flow_pb2.Flow | None = None
        if self._any_whitelist:
            for record_checks, flow_checks in self._whitelist:
                if all(check(record) for check in record_checks):
                    if not flow_checks:
                        break
                    if flow is None:
                        flow = record.parse()
                    if all(check(flow) for check in flow_checks):
                        break
            else:
                return False
        for record_checks, flow_checks in self._blacklist:
            if all(check(record) for check in record_checks):
                if flow_checks:
                    if flow is None:
                        flow = record.parse()
                    if not all(check(flow) for check in flow_checks):
                        continue
                return False
        return True


class FlowMatcher:
    """A request's whitelist and blacklist. Example::

    matcher = FlowMatcher(request.whitelist, request.blacklist)
    node_matcher = matcher.for_node("kind-worker")   # None when nothing from that node can pass
    """

    def __init__(
        self, whitelist: Sequence[flow_pb2.FlowFilter] = (), blacklist: Sequence[flow_pb2.FlowFilter] = ()
    ) -> None:
        self.whitelist = [compile_filter(f, f"whitelist[{i}]") for i, f in enumerate(whitelist)]
        self.blacklist = [compile_filter(f, f"blacklist[{i}]") for i, f in enumerate(blacklist)]
        self._per_node: dict[str, NodeMatcher | None] = {}

    @property
    def accepts_all(self) -> bool:
        """True when the request has no filters at all."""
        return not self.whitelist and not self.blacklist

    def for_node(self, node_name: str) -> NodeMatcher | None:
        """The filters that can matter for flows of `node_name`; None when no flow of that node can pass."""
        if node_name in self._per_node:
            return self._per_node[node_name]
        whitelist = [f for f in self.whitelist if f.node_matches(node_name)]
        blacklist = [f for f in self.blacklist if f.node_matches(node_name)]
        result: NodeMatcher | None
        if self.whitelist and not whitelist:
            result = None  # every whitelist filter names other nodes
        elif any(not f.record_checks and not f.flow_checks for f in blacklist):
            result = None  # a blacklist filter excludes this whole node
        else:
            result = NodeMatcher(whitelist, blacklist, bool(self.whitelist))
        self._per_node[node_name] = result
        return result

    def matches(self, flow: flow_pb2.Flow) -> bool:
        """Whether a decoded flow passes the whitelist and blacklist."""
        node_matcher = self.for_node(flow.node_name)
        return node_matcher is not None and node_matcher(MessageRecord(flow))
