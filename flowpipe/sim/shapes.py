"""How one connection becomes Hubble flows: policy verdicts, both observation points, replies, L7 records, drops.

Each flow is written as a record `(time_ns, seq, template, l4 proto, a, b, tcp flags, l7 spec, tag, start)`; the
simulator orders records in time. `tag` names the ground-truth counter a record belongs to (-1: none) and `start`
marks the first (earliest) record of an attempt, so that attempts can be counted exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from itertools import count
from typing import Any

from flowpipe._proto.flow import flow_pb2
from flowpipe.sim.cluster import WORLD_IDENTITY
from flowpipe.sim.policies import Decision
from flowpipe.sim.wire import (
    ACK,
    DROP,
    FIN,
    L7_REQUEST,
    L7_RESPONSE,
    MS,
    POLICY_VERDICT,
    PSH,
    SOCK,
    SYN,
    TCP,
    TRACE,
    US,
    EndpointView,
    L7Spec,
    PolicyRef,
    TemplateFactory,
)

Record = tuple[Any, ...]


EG = flow_pb2.EGRESS
IN = flow_pb2.INGRESS
_TO_ENDPOINT = flow_pb2.TO_ENDPOINT
_TO_PROXY = flow_pb2.TO_PROXY
_TO_STACK = flow_pb2.TO_STACK
_TO_OVERLAY = flow_pb2.TO_OVERLAY
_FORWARDED = flow_pb2.FORWARDED
_DROPPED = flow_pb2.DROPPED
_REDIRECTED = flow_pb2.REDIRECTED
POLICY_DENIED = 133
CT_MAP_INSERTION_FAILED = 155
STALE_OR_UNROUTABLE_IP = 151


class Writer:
    """Writes the records of connections: owns the templates, the record sequence and attribution references."""

    def __init__(
        self, node_names: dict[str, str], rng: random.Random, emit: Callable[[Record], None]
    ) -> None:
        self.full_node = node_names
        self.rng = rng
        self.emit = emit
        self.factory = TemplateFactory()
        self.seq = count()
        self.made = 0
        self._refs: dict[tuple[int, int], tuple[PolicyRef, ...]] = {}

    def refs(self, decision: Decision, revision: int) -> tuple[PolicyRef, ...]:
        """The attribution entries for a decision's policies at a policy revision."""
        key = (id(decision), revision)
        refs = self._refs.get(key)
        if refs is None:
            refs = tuple(PolicyRef(p.name, p.namespace, p.kind, revision) for p in decision.policies)
            self._refs[key] = refs
        return refs

    def delay(self, src: EndpointView, dst: EndpointView) -> int:
        """A one-way delay: tens of µs on a node, hundreds across nodes, milliseconds to the internet."""
        uniform = self.rng.uniform
        if src.node is not None and dst.node is not None:
            return int(uniform(10, 40) * US) if src.node == dst.node else int(uniform(70, 260) * US)
        inside = WORLD_IDENTITY not in (src.identity, dst.identity)
        return int(uniform(60, 300) * US) if inside else int(uniform(2, 20) * MS)


class Conn:
    """One connection attempt: its endpoints and ports, and the shapes of flows it can produce."""

    __slots__ = ("dport", "dst", "proto", "revision", "sport", "src", "tag", "w")

    def __init__(
        self,
        w: Writer,
        src: EndpointView,
        dst: EndpointView,
        proto: int,
        sport: int,
        dport: int,
        tag: int,
        revision: int,
    ) -> None:
        self.w, self.src, self.dst, self.proto = w, src, dst, proto
        self.sport, self.dport, self.tag, self.revision = sport, dport, tag, revision

    def fwd(
        self,
        t: int,
        node: str,
        cls: int,
        flags: int = 0,
        l7: L7Spec | None = None,
        start: int = 0,
        **spec: Any,
    ) -> None:
        """A flow of the request direction (source to destination) observed at `node`."""
        w = self.w
        template = w.factory.get(w.full_node[node], self.src, self.dst, cls, **spec)
        w.made += 1
        w.emit((t, next(w.seq), template, self.proto, self.sport, self.dport, flags, l7, self.tag, start))

    def rev(self, t: int, node: str, cls: int, flags: int = 0, l7: L7Spec | None = None, **spec: Any) -> None:
        """A flow of the reply direction (destination back to source) observed at `node`."""
        w = self.w
        template = w.factory.get(w.full_node[node], self.dst, self.src, cls, reply=True, **spec)
        w.made += 1
        w.emit((t, next(w.seq), template, self.proto, self.dport, self.sport, flags, l7, self.tag, 0))

    def syn_retransmits(self) -> tuple[int, ...]:
        """The delays (ns) after which a TCP client sends an unanswered SYN again: Linux waits 1 s, then twice
        as long each time; the simulated clients give up after 0 to 2 retries."""
        if self.proto != TCP:
            return ()
        return ((), (1000 * MS,), (1000 * MS, 3000 * MS))[self.w.rng.randrange(3)]

    def sock_translation(self, t: int, service: EndpointView) -> None:
        """The socket-LB events of connect() to a Service, at the client's node: the Service address before
        translation (TRACED), then the chosen backend (TRANSLATED). They are not packets: no ground-truth tag."""
        w, node = self.w, self.src.node
        assert node is not None
        for offset, dst, verdict, point in (
            (0, service, flow_pb2.TRACED, flow_pb2.SOCK_XLATE_POINT_PRE_DIRECTION_FWD),
            (200, self.dst, flow_pb2.TRANSLATED, flow_pb2.SOCK_XLATE_POINT_POST_DIRECTION_FWD),
        ):
            template = w.factory.get(
                w.full_node[node], self.src, dst, SOCK, verdict=verdict, direction=0, point=point, reply=None
            )
            w.made += 1
            # One socket, one cookie: the client's endpoint and its source port tell connections apart.
            cookie = ("sock", (self.src.endpoint_id << 16) | self.sport)
            w.emit((t + offset, next(w.seq), template, self.proto, self.sport, self.dport, 0, cookie, -1, 0))

    def verdict(self, t: int, node: str, decision: Decision, direction: int, start: int) -> bool:
        """The policy-verdict event of the first packet where a policy is enforced; False when none is."""
        if not decision.enforced:
            return False
        refs = self.w.refs(decision, self.revision)
        flags = SYN if self.proto == TCP else 0
        if decision.allowed:
            verdict = _REDIRECTED if decision.l7 else _FORWARDED
            spec = {"verdict": verdict, "match_type": decision.match_type, "allowed": refs}
        else:
            spec = {"verdict": _DROPPED, "drop_reason": POLICY_DENIED, "denied": refs}
        self.fwd(t, node, POLICY_VERDICT, flags, None, start, direction=direction, **spec)
        return True

    def denied(self, t: int, decision: Decision, direction: int, retransmits: tuple[int, ...] = ()) -> None:
        """A first packet denied by policy: the policy verdict and the drop notification at the enforcing node.

        An ingress denial is seen at both ends: the source's node forwards the packet (to the overlay, or the
        stack on one node) before the destination's node drops it. A denied TCP SYN is sent again after each
        delay of `retransmits` (ns): the same 5-tuple, the same records, one connection attempt.
        """
        for sent in (t, *(t + delay for delay in retransmits)):
            self._denied_packet(sent, decision, direction, first=sent == t)

    def _denied_packet(self, t: int, decision: Decision, direction: int, *, first: bool) -> None:
        src, dst = self.src, self.dst
        flags = SYN if self.proto == TCP else 0
        mark = 1 if first else 0
        start = mark
        if direction == IN and src.node is not None:
            point = _TO_OVERLAY if src.node != dst.node else _TO_STACK
            self.fwd(t, src.node, TRACE, flags, None, mark, direction=EG, point=point)
            t += self.w.delay(src, dst)
            start = 0
        node = src.node if direction == EG else dst.node
        assert node is not None
        self.verdict(t, node, decision, direction, start)
        refs = self.w.refs(decision, self.revision)
        self.fwd(
            t + 1500,
            node,
            DROP,
            flags,
            None,
            0,
            verdict=_DROPPED,
            direction=direction,
            reply=None,
            drop_reason=POLICY_DENIED,
            denied=refs,
        )

    def datapath_drop(self, t: int, reason: int) -> None:
        """A first packet dropped by the datapath for a reason other than policy, seen at the source node."""
        assert self.src.node is not None
        flags = SYN if self.proto == TCP else 0
        self.fwd(
            t,
            self.src.node,
            DROP,
            flags,
            None,
            1,
            verdict=_DROPPED,
            direction=EG,
            reply=None,
            drop_reason=reason,
        )

    def tcp(
        self, t0: int, eg: Decision, ing: Decision, latency: int, l7: tuple[L7Spec, L7Spec] | None
    ) -> None:
        """A whole allowed TCP connection: handshake, one request and response, close; every observation point.

        Where an allowing rule redirects to the proxy, the request packets are traced TO_PROXY and the L7
        request/response records are written at that side.
        """
        src, dst = self.src, self.dst
        delay = self.w.delay(src, dst)
        at_src, at_dst = src.node, dst.node
        cross = at_src is not None and at_dst is not None and at_src != at_dst
        fwd_src_point = _TO_PROXY if eg.l7 else (_TO_OVERLAY if cross else _TO_STACK)
        fwd_dst_point = _TO_PROXY if ing.l7 else _TO_ENDPOINT
        rep_dst_point = _TO_OVERLAY if cross else _TO_STACK
        syn_s = t0 + 2 * US
        synack_d = syn_s + delay + 30 * US
        ack_s = synack_d + delay + 20 * US
        req_s = ack_s + 40 * US
        resp_d = req_s + delay + latency
        fin_s = resp_d + delay + 200 * US
        finr_d = fin_s + delay + 40 * US
        # (request direction?, flags, time of the packet at its sender)
        packets = (
            (True, SYN, syn_s),
            (False, SYN | ACK, synack_d),
            (True, ACK, ack_s),
            (True, PSH | ACK, req_s),
            (False, PSH | ACK, resp_d),
            (True, FIN | ACK, fin_s),
            (False, FIN | ACK, finr_d),
        )
        # The `start` mark goes on the earliest record: the first verdict, else the first SYN trace.
        start_src = start_dst = 0
        if at_src is not None:
            start_src = 0 if self.verdict(t0, at_src, eg, EG, 1) else 1
        if at_dst is not None:
            first = 1 if at_src is None else 0
            start_dst = 0 if self.verdict(syn_s + delay - US, at_dst, ing, IN, first) else first
        for forward, flags, sent in packets:
            if forward:
                if at_src is not None:
                    self.fwd(sent, at_src, TRACE, flags, None, start_src, direction=EG, point=fwd_src_point)
                    start_src = 0
                if at_dst is not None:
                    self.fwd(
                        sent + delay, at_dst, TRACE, flags, None, start_dst, direction=IN, point=fwd_dst_point
                    )
                    start_dst = 0
            else:
                if at_dst is not None:
                    self.rev(sent, at_dst, TRACE, flags, direction=IN, point=rep_dst_point)
                if at_src is not None:
                    self.rev(sent + delay, at_src, TRACE, flags, direction=EG, point=_TO_ENDPOINT)
        if l7 is None:
            return
        request, response = l7
        if ing.l7 and at_dst is not None:
            self.fwd(req_s + delay + 8 * US, at_dst, L7_REQUEST, 0, request, direction=IN)
            self.rev(resp_d - 5 * US, at_dst, L7_RESPONSE, 0, response, direction=IN)
        elif eg.l7 and at_src is not None:
            self.fwd(req_s + 8 * US, at_src, L7_REQUEST, 0, request, direction=EG)
            self.rev(resp_d + delay - 5 * US, at_src, L7_RESPONSE, 0, response, direction=EG)

    def lookup(
        self,
        t0: int,
        eg: Decision,
        query: str,
        ips: tuple[str, ...],
        ttl: int,
        rcode: int,
        latency: int,
        first: bool = True,
    ) -> int:
        """One DNS query (A record) from a pod to CoreDNS; rcode -1 means no answer ever comes. `first`: the first
        query of a lookup (the later names of its search path are not new attempts).

        Returns when the answer reached the pod, or -1 when there is none (denied or unanswered).
        """
        if not eg.allowed:
            self.denied(t0, eg, EG)
            return -1
        src, dst = self.src, self.dst
        assert src.node is not None and dst.node is not None
        delay = self.w.delay(src, dst)
        cross = src.node != dst.node
        mark = 1 if first else 0
        start = 0 if self.verdict(t0, src.node, eg, EG, mark) else mark
        proxied = eg.l7 == "dns"
        point = _TO_PROXY if proxied else (_TO_OVERLAY if cross else _TO_STACK)
        self.fwd(t0 + 2 * US, src.node, TRACE, 0, None, start, direction=EG, point=point)
        requested = t0 + 25 * US
        if proxied:
            self.fwd(requested, src.node, L7_REQUEST, 0, ("dns", 1, 0, query, (), 0, 0, ("A",)), direction=EG)
        received = requested + 40 * US + delay
        self.fwd(received, dst.node, TRACE, 0, direction=IN, point=_TO_ENDPOINT)
        if rcode < 0:
            return -1
        answered = received + latency
        self.rev(answered, dst.node, TRACE, 0, direction=IN, point=_TO_OVERLAY if cross else _TO_STACK)
        arrived = answered + delay + 15 * US
        if proxied:
            ok = rcode == 0
            record = (
                "dns",
                2,
                arrived - requested,
                query,
                ips if ok else (),
                ttl if ok else 0,
                rcode,
                ("A",),
            )
            self.rev(arrived, src.node, L7_RESPONSE, 0, record, direction=EG)
        self.rev(arrived + 10 * US, src.node, TRACE, 0, direction=EG, point=_TO_ENDPOINT)
        return arrived + 10 * US

    def echo(self, t0: int, rtt: int) -> None:
        """An ICMPv4 echo request and its reply, seen at the sender's node (type/code ride in the ports)."""
        assert self.src.node is not None
        self.fwd(t0, self.src.node, TRACE, 0, None, 1, direction=EG, point=_TO_STACK)
        self.rev(t0 + rtt, self.src.node, TRACE, 0, direction=EG, point=_TO_ENDPOINT)
