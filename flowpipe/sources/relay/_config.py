"""The relay source's configuration, and the node-shard, verdict and time-text helpers."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flowpipe._proto.flow import flow_pb2
from flowpipe.errors import ConfigError
from flowpipe.sources.relay._address import RelayTLS, split_address

ALL_EVENTS = 2**64 - 1
"""`GetFlowsRequest.number` for "everything in the buffer" (what `hubble observe --all` sends)."""

RECEIVERS = ("http2", "grpcio")
"""How the GetFlows stream is read: `http2`, flowpipe's own HTTP/2 reader (`_h2call`: a slice a message, in
either process); `grpcio`, the gRPC library's client in the collecting process (several microseconds a message,
for relays or proxies the built-in reader has trouble with)."""


def parse_node_shard(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N) → (I, N); ConfigError otherwise."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise ConfigError(
            f"--node-shard {text!r} must be I/N with 0 <= I < N, e.g. 0/3, 1/3 and 2/3 for three collectors"
        )
    return i, n


def node_shard_of(node_name: str, shards: int) -> int:
    """The shard (0..shards-1) a node belongs to: a stable hash of its name, the same in every collector."""
    digest = hashlib.sha256(node_name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def node_name_matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a node name matches one of the `--node` glob patterns as the relay's node_name filter matches it.

    Both are compared as "<cluster>/<node>": a name without a cluster is in the `default` cluster (Hubble leaves
    that one out), a pattern without one matches any cluster, and `*` never crosses the "/".
    """
    qualified = name if "/" in name else "default/" + name
    for pattern in patterns:
        if "/" not in pattern:
            pattern = "*/" + pattern
        regex = "".join("[^/]*" if ch == "*" else re.escape(ch) for ch in pattern)
        if re.fullmatch(regex, qualified):
            return True
    return False


def backoff_seconds(
    attempt: int, initial: float, cap: float, uniform: Callable[[float, float], float] = random.uniform
) -> float:
    """How long to wait before reconnection attempt `attempt` (1, 2, ...): `initial` doubled per attempt up to
    `cap`, with jitter (a random point in the upper half), so that collectors cut off together do not retry in
    step."""
    delay = min(cap, initial * 2 ** min(attempt - 1, 30))
    return uniform(delay / 2, delay)


def verdict_numbers(names: Sequence[str]) -> list[int]:
    """Verdict names (case-insensitive) → enum numbers; ConfigError naming the valid ones."""
    known = {v.name: v.number for v in flow_pb2.DESCRIPTOR.enum_types_by_name["Verdict"].values if v.number}
    numbers = []
    for name in names:
        number = known.get(name.strip().upper())
        if number is None:
            raise ConfigError(f"unknown verdict {name!r}; one of {', '.join(known)}")
        numbers.append(number)
    return numbers


@dataclass(frozen=True, slots=True)
class RelaySourceConfig:
    """Where the relay is, what to ask it for, and how to follow it."""

    address: str = field(
        metadata={"help": "hubble-relay address HOST:PORT (e.g. hubble-relay.kube-system:80)."}
    )
    tls_ca: str | None = field(
        default=None,
        metadata={"help": "CA certificate (PEM) that signed the relay's certificate; enables TLS."},
    )
    tls_cert: str | None = field(
        default=None, metadata={"help": "Client certificate (PEM) for mutual TLS; enables TLS."}
    )
    tls_key: str | None = field(default=None, metadata={"help": "Key (PEM) of the client certificate."})
    tls_server_name: str | None = field(
        default=None,
        metadata={
            "help": "Name to verify the relay's certificate against (default: the host of the address); enables TLS."
        },
    )
    namespaces: tuple[str, ...] = field(
        default=(), metadata={"help": "Only flows from or to these namespaces (server-side filter)."}
    )
    verdicts: tuple[str, ...] = field(
        default=(), metadata={"help": "Only flows with these verdicts (default: every verdict)."}
    )
    nodes: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Only flows observed on these nodes (glob patterns on <cluster>/<node>)."},
    )
    node_shard: tuple[int, int] | None = field(
        default=None, metadata={"help": "I/N: take only the nodes whose name hashes to shard I of N."}
    )
    cluster_name: str | None = field(
        default=None, metadata={"help": "Cluster name for flows whose node name does not carry one."}
    )
    field_mask: bool = field(
        default=True, metadata={"help": "Ask the relay only for the flow fields flowpipe stores."}
    )
    batch_max_flows: int = field(
        default=4096, metadata={"help": "Most flows decoded together into one batch."}
    )
    batch_max_seconds: float = field(
        default=0.25, metadata={"help": "Longest time a received flow waits before its batch is decoded."}
    )
    max_pending_flows: int = field(
        default=8192, metadata={"help": "Received flows waiting to be decoded before the stream is paused."}
    )
    resume_overlap_seconds: float = field(
        default=10.0,
        metadata={
            "help": "On resume, ask again from this long before the last flow received (repeats are skipped)."
        },
    )
    reconnect_backoff_initial_seconds: float = field(
        default=0.5, metadata={"help": "First wait before reconnecting."}
    )
    reconnect_backoff_max_seconds: float = field(
        default=30.0, metadata={"help": "Longest wait between reconnection attempts."}
    )
    startup_timeout_seconds: float | None = field(
        default=None,
        metadata={
            "help": "Give up when the relay cannot be reached for this long at startup (default: keep trying)."
        },
    )
    call_timeout_seconds: float = field(
        default=10.0, metadata={"help": "Deadline of ServerStatus and GetNodes calls."}
    )
    node_refresh_seconds: float = field(
        default=60.0, metadata={"help": "With --node-shard: how often the relay's node list is read again."}
    )
    receiver: str = field(
        default="http2",
        metadata={
            "help": "How the flow stream is read: http2 (flowpipe's own HTTP/2 reader) or grpcio (the gRPC "
            "library's client, in one process: for relays or proxies the built-in reader has trouble with)."
        },
    )

    def __post_init__(self) -> None:
        split_address(self.address)
        for name in ("batch_max_flows", "batch_max_seconds", "max_pending_flows", "reconnect_backoff_initial_seconds",
                     "reconnect_backoff_max_seconds", "call_timeout_seconds", "node_refresh_seconds"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ConfigError(f"RelaySourceConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.receiver not in RECEIVERS:
            raise ConfigError(f"receiver must be one of {', '.join(RECEIVERS)}, got {self.receiver!r}")
        if self.resume_overlap_seconds < 0:
            raise ConfigError("resume_overlap_seconds must be >= 0")
        if self.startup_timeout_seconds is not None and self.startup_timeout_seconds <= 0:
            raise ConfigError("startup_timeout_seconds must be > 0")
        verdict_numbers(self.verdicts)
        for namespace in self.namespaces:
            if not namespace or "/" in namespace:
                raise ConfigError(f"--namespace {namespace!r} must be a namespace name")
        self.tls  # noqa: B018  (validates cert/key pairing)

    @property
    def tls(self) -> RelayTLS | None:
        """TLS settings when any TLS option is set; None for plaintext."""
        if not any((self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name)):
            return None
        return RelayTLS(self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name)

    @property
    def shard_label(self) -> str | None:
        """`I/N`, or None without sharding."""
        return None if self.node_shard is None else f"{self.node_shard[0]}/{self.node_shard[1]}"


def iso_time(time_ns: int) -> str:
    """Nanoseconds since the epoch as RFC 3339 UTC with nanoseconds."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"
