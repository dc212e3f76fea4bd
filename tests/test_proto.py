"""The committed Hubble stubs: current with proto/, true to the Hubble API facts, usable over real gRPC."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, json_format, timestamp_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, FileDescriptor

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2, observer_pb2_grpc
from flowpipe._proto.peer import peer_pb2, peer_pb2_grpc
from flowpipe._proto.relay import relay_pb2

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "flowpipe" / "_proto"
FACTS = ROOT.parent / "shared" / "hubble-api.md"
FILES: list[FileDescriptor] = [
    flow_pb2.DESCRIPTOR,
    relay_pb2.DESCRIPTOR,
    observer_pb2.DESCRIPTOR,
    peer_pb2.DESCRIPTOR,
]
ENVELOPE_KEYS = {"flow", "lost_events", "node_status", "agent_event", "debug_event"}

SCALAR_NAMES = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
}

# Method -> (request, response, server streaming); the Observer and Peer services of Hubble.
SERVICES = {
    "/observer.Observer/GetFlows": ("observer.GetFlowsRequest", "observer.GetFlowsResponse", True),
    "/observer.Observer/GetAgentEvents": (
        "observer.GetAgentEventsRequest",
        "observer.GetAgentEventsResponse",
        True,
    ),
    "/observer.Observer/GetDebugEvents": (
        "observer.GetDebugEventsRequest",
        "observer.GetDebugEventsResponse",
        True,
    ),
    "/observer.Observer/GetNodes": ("observer.GetNodesRequest", "observer.GetNodesResponse", False),
    "/observer.Observer/GetNamespaces": (
        "observer.GetNamespacesRequest",
        "observer.GetNamespacesResponse",
        False,
    ),
    "/observer.Observer/ServerStatus": (
        "observer.ServerStatusRequest",
        "observer.ServerStatusResponse",
        False,
    ),
    "/peer.Peer/Notify": ("peer.NotifyRequest", "peer.ChangeNotification", True),
}


# --------------------------------------------------------------------------- the facts file, parsed


@dataclass
class FactField:
    number: int
    name: str
    type: str  # "uint32", "flow.Endpoint", "google.protobuf.BoolValue", ...
    is_enum: bool
    repeated: bool
    json_name: str
    oneof: str | None
    deprecated: bool


@dataclass
class FactBlock:
    kind: str  # "message", "enum" or "service"
    name: str
    deprecated: bool = False
    no_fields: bool = False
    rows: list[list[str]] = field(default_factory=list)
    reserved: set[int] = field(default_factory=set)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _untick(text: str) -> str:
    return text.replace("`", "").strip()


def _numbers(text: str) -> set[int]:
    """ "7, 12, 17" or "1-3" -> the set of numbers."""
    out: set[int] = set()
    for low, high in re.findall(r"(\d+)(?:\s*[-–]\s*(\d+))?", text):
        out.update(range(int(low), int(high or low) + 1))
    return out


def parse_facts(text: str) -> dict[str, FactBlock]:
    """The `#### message|enum|service` blocks of the facts file: table rows and reserved numbers."""
    blocks: dict[str, FactBlock] = {}
    current: FactBlock | None = None
    for line in text.splitlines():
        head = re.match(r"^#### (message|enum|service) `([\w.]+)`(.*)$", line)
        if head:
            current = FactBlock(head.group(1), head.group(2), deprecated="deprecated" in head.group(3))
            blocks[current.name] = current
        elif line.startswith("#"):
            current = None
        elif current is None:
            continue
        elif line.strip() == "No fields.":
            current.no_fields = True
        elif line.startswith("Reserved numbers"):
            current.reserved = _numbers(line.split(":", 1)[1])
        elif line.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", line.strip()):
            cells = _cells(line)
            if cells[0] not in ("#", "value", "method"):
                current.rows.append(cells)
    return blocks


def message_fields(block: FactBlock) -> list[FactField]:
    """The field rows of a message block."""
    out = []
    for number, name, type_, label, json_key, note in (row[:6] for row in block.rows):
        keys = [_untick(k) for k in json_key.split("/")]
        notes = [n.strip() for n in note.split(";")]
        oneof = next((_untick(n[len("oneof ") :]) for n in notes if n.startswith("oneof ")), None)
        out.append(
            FactField(
                number=int(number),
                name=_untick(name),
                type=_untick(type_.removeprefix("enum ")),
                is_enum=type_.startswith("enum "),
                repeated=label == "repeated",
                json_name=keys[-1],
                oneof=oneof,
                deprecated="deprecated" in notes,
            )
        )
    return out


def enum_values(block: FactBlock) -> list[tuple[int, str, bool]]:
    """(number, name, deprecated) of an enum block; tables may hold several value/name column pairs."""
    out = []
    for row in block.rows:
        for value, name in zip(row[0::2], row[1::2]):
            if not value:
                continue
            m = re.fullmatch(r"(\w+)\s*(\((?:dep\.|deprecated)\))?", _untick(name))
            assert m, f"unreadable enum entry {name!r} in {block.name}"
            out.append((int(value), m.group(1), m.group(2) is not None))
    return out


@pytest.fixture(scope="module")
def facts() -> dict[str, FactBlock]:
    """The Hubble API fact tables; skips where ../shared is absent."""
    if not FACTS.is_file():
        pytest.skip("Hubble API facts (../shared/hubble-api.md) are not present")
    return parse_facts(FACTS.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- our descriptors


def _walk_messages(descs: Any) -> Iterator[Descriptor]:
    for d in descs:
        yield d
        yield from _walk_messages(d.nested_types)


def our_messages() -> dict[str, Descriptor]:
    return {d.full_name: d for f in FILES for d in _walk_messages(f.message_types_by_name.values())}


def our_enums() -> dict[str, EnumDescriptor]:
    enums = {e.full_name: e for f in FILES for e in f.enum_types_by_name.values()}
    for msg in our_messages().values():
        enums.update({e.full_name: e for e in msg.enum_types})
    return enums


def reserved_numbers() -> dict[str, set[int]]:
    """Reserved field/value numbers per full name, read from the file descriptor protos."""
    out: dict[str, set[int]] = {}

    def visit_enum(prefix: str, e: descriptor_pb2.EnumDescriptorProto) -> None:
        out[f"{prefix}{e.name}"] = {n for r in e.reserved_range for n in range(r.start, r.end + 1)}

    def visit_msg(prefix: str, m: descriptor_pb2.DescriptorProto) -> None:
        out[f"{prefix}{m.name}"] = {n for r in m.reserved_range for n in range(r.start, r.end)}
        for nested in m.nested_type:
            visit_msg(f"{prefix}{m.name}.", nested)
        for e in m.enum_type:
            visit_enum(f"{prefix}{m.name}.", e)

    for f in FILES:
        proto = descriptor_pb2.FileDescriptorProto()
        f.CopyToProto(proto)
        for m in proto.message_type:
            visit_msg(f"{proto.package}.", m)
        for e in proto.enum_type:
            visit_enum(f"{proto.package}.", e)
    return out


def type_name(fd: FieldDescriptor) -> str:
    if fd.message_type is not None:
        return fd.message_type.full_name
    if fd.enum_type is not None:
        return fd.enum_type.full_name
    return SCALAR_NAMES[fd.type]


# --------------------------------------------------------------------------- (a) stubs are current


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".pyi")
    }


def test_regenerating_the_stubs_changes_nothing(tmp_path: Path) -> None:
    grpc_stub = (GENERATED / "observer" / "observer_pb2_grpc.py").read_text(encoding="utf-8")
    pinned = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_stub)
    assert pinned is not None
    installed = importlib.metadata.version("grpcio-tools")
    assert installed == pinned.group(1), (
        f"the stubs come from grpcio-tools {pinned.group(1)} but {installed} is installed"
    )
    out = tmp_path / "_proto"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(out)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    fresh, committed = _tree(out), _tree(GENERATED)
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files (run `make proto`): {stale}"


def test_stubs_import_from_any_directory(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from flowpipe._proto.observer import observer_pb2, observer_pb2_grpc\n"
        "from flowpipe._proto.peer import peer_pb2_grpc\n"
        "assert 'flow' not in sys.modules and 'observer' not in sys.modules, sorted(sys.modules)\n"
        "print(observer_pb2.GetFlowsResponse.DESCRIPTOR.fields_by_name['flow'].message_type.full_name)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "flow.Flow"


def test_files_packages_and_public_import() -> None:
    assert [(f.name, f.package) for f in FILES] == [
        ("flow/flow.proto", "flow"),
        ("relay/relay.proto", "relay"),
        ("observer/observer.proto", "observer"),
        ("peer/peer.proto", "peer"),
    ]
    # observer re-exports the flow types, as upstream does.
    assert [d.name for d in observer_pb2.DESCRIPTOR.public_dependencies] == ["flow/flow.proto"]
    assert observer_pb2.Flow is flow_pb2.Flow


# --------------------------------------------------------------------------- (b) descriptors == facts


def test_every_fact_message_matches_the_descriptors(facts: dict[str, FactBlock]) -> None:
    ours = our_messages()
    reserved = reserved_numbers()
    fact_messages = {n: b for n, b in facts.items() if b.kind == "message"}
    assert len(fact_messages) > 60, "the facts file was not parsed"
    assert sorted(fact_messages) == sorted(ours), "messages differ from the facts"
    for name, block in fact_messages.items():
        desc = ours[name]
        expected = message_fields(block)
        assert not block.no_fields or not expected
        assert sorted(f.number for f in expected) == sorted(f.number for f in desc.fields), name
        for fact in expected:
            fd = desc.fields_by_number[fact.number]
            where = f"{name}.{fact.name} = {fact.number}"
            assert fd.name == fact.name, where
            assert type_name(fd) == fact.type, where
            assert (fd.enum_type is not None) == fact.is_enum, where
            assert fd.is_repeated == fact.repeated, where
            assert fd.json_name == fact.json_name, where
            real_oneof = fd.containing_oneof.name if fd.containing_oneof is not None else None
            assert real_oneof == fact.oneof, where
            assert fd.GetOptions().deprecated == fact.deprecated, where
        assert desc.GetOptions().deprecated == block.deprecated, name
        assert reserved[name] == block.reserved, name


def test_every_fact_enum_matches_the_descriptors(facts: dict[str, FactBlock]) -> None:
    ours = our_enums()
    reserved = reserved_numbers()
    fact_enums = {n: b for n, b in facts.items() if b.kind == "enum"}
    assert len(fact_enums) > 15, "the facts file was not parsed"
    assert sorted(fact_enums) == sorted(ours), "enums differ from the facts"
    for name, block in fact_enums.items():
        expected = enum_values(block)
        actual = [(v.number, v.name, v.GetOptions().deprecated) for v in ours[name].values]
        assert sorted(actual) == sorted(expected), name
        assert reserved[name] == block.reserved, name


def test_drop_reason_facts_are_complete(facts: dict[str, FactBlock]) -> None:
    values = {number: name for number, name, _ in enum_values(facts["flow.DropReason"])}
    assert values[133] == "POLICY_DENIED" and values[130] == "INVALID_SOURCE_MAC"
    assert 159 not in values and set(range(130, 206)) - {159} <= set(values)
    assert flow_pb2.DropReason.Name(205) == "DROP_PUNT_PROXY"


def test_services_match_the_facts(facts: dict[str, FactBlock]) -> None:
    rows = [row for b in facts.values() if b.kind == "service" for row in b.rows]
    from_facts = {
        _untick(path): (_untick(req), _untick(resp), kind == "server-streaming")
        for _method, path, req, resp, kind in (row[:5] for row in rows)
    }
    assert from_facts == SERVICES


# --------------------------------------------------------------------------- (c) service surface


def test_service_methods_paths_and_streaming() -> None:
    actual = {}
    for f in (observer_pb2.DESCRIPTOR, peer_pb2.DESCRIPTOR):
        for service in f.services_by_name.values():
            for m in service.methods:
                actual[f"/{service.full_name}/{m.name}"] = (
                    m.input_type.full_name,
                    m.output_type.full_name,
                    m.server_streaming,
                )
                assert not m.client_streaming
    assert actual == SERVICES
    assert not flow_pb2.DESCRIPTOR.services_by_name and not relay_pb2.DESCRIPTOR.services_by_name


class _Observer(observer_pb2_grpc.ObserverServicer):
    def GetFlows(self, request: Any, context: Any) -> Iterator[Any]:
        yield observer_pb2.GetFlowsResponse(
            node_status=relay_pb2.NodeStatusEvent(state_change=relay_pb2.NODE_CONNECTED, node_names=["n1"])
        )
        for i in range(request.number):
            yield observer_pb2.GetFlowsResponse(flow=flow_pb2.Flow(verdict=flow_pb2.DROPPED, uuid=str(i)))

    def ServerStatus(self, request: Any, context: Any) -> Any:
        return observer_pb2.ServerStatusResponse(num_flows=7, version="test")


class _Peer(peer_pb2_grpc.PeerServicer):
    def Notify(self, request: Any, context: Any) -> Iterator[Any]:
        yield peer_pb2.ChangeNotification(name="n1", type=peer_pb2.PEER_ADDED)


def test_generated_stubs_talk_over_real_grpc() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    observer_pb2_grpc.add_ObserverServicer_to_server(_Observer(), server)
    peer_pb2_grpc.add_PeerServicer_to_server(_Peer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = observer_pb2_grpc.ObserverStub(channel)
            replies = list(stub.GetFlows(observer_pb2.GetFlowsRequest(number=2)))
            assert [r.WhichOneof("response_types") for r in replies] == ["node_status", "flow", "flow"]
            assert [r.flow.uuid for r in replies[1:]] == ["0", "1"]
            assert stub.ServerStatus(observer_pb2.ServerStatusRequest()).num_flows == 7
            with pytest.raises(grpc.RpcError) as missing:
                stub.GetNodes(observer_pb2.GetNodesRequest())
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # The raw method path is what a Hubble server routes on.
            raw = channel.unary_unary(
                "/observer.Observer/ServerStatus",
                request_serializer=observer_pb2.ServerStatusRequest.SerializeToString,
                response_deserializer=observer_pb2.ServerStatusResponse.FromString,
            )
            assert raw(observer_pb2.ServerStatusRequest()).version == "test"
            notes = list(peer_pb2_grpc.PeerStub(channel).Notify(peer_pb2.NotifyRequest()))
            assert [(n.name, n.type) for n in notes] == [("n1", peer_pb2.PEER_ADDED)]
    finally:
        server.stop(None)


# --------------------------------------------------------------------------- (d) real captures


def test_every_real_capture_line_parses(capture_files: list[Path]) -> None:
    lines = 0
    for path in capture_files:
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{number}"
                data = json.loads(line)
                if ENVELOPE_KEYS & data.keys():
                    loose = json_format.Parse(
                        line, observer_pb2.GetFlowsResponse(), ignore_unknown_fields=True
                    )
                    strict: Any = json_format.Parse(line, observer_pb2.ExportEvent())
                    assert loose.WhichOneof("response_types") == strict.WhichOneof("response_types"), where
                else:
                    strict = json_format.Parse(line, flow_pb2.Flow())
                # Every key is known and renders back the same way Hubble wrote it.
                assert json_format.MessageToDict(strict, preserving_proto_field_name=True) == data, where
                lines += 1
    assert lines > 0


# --------------------------------------------------------------------------- (e) shared envelope numbers


def test_get_flows_response_bytes_decode_as_export_event() -> None:
    when = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5)
    flow = flow_pb2.Flow(
        time=when,
        verdict=flow_pb2.DROPPED,
        drop_reason_desc=flow_pb2.POLICY_DENIED,
        node_name="c1/n1",
        IP=flow_pb2.IP(source="10.0.0.1", destination="10.0.0.2", ipVersion=flow_pb2.IPv4),
        l4=flow_pb2.Layer4(TCP=flow_pb2.TCP(source_port=4242, destination_port=80)),
        Summary="TCP Flags: SYN",
    )
    flow.is_reply.value = False
    response = observer_pb2.GetFlowsResponse(flow=flow, node_name="c1/n1", time=when)
    event = observer_pb2.ExportEvent.FromString(response.SerializeToString())
    assert event.WhichOneof("response_types") == "flow"
    assert event.flow == flow and event.flow.HasField("is_reply")
    assert (event.node_name, event.time) == ("c1/n1", when)

    lost = observer_pb2.GetFlowsResponse(
        lost_events=flow_pb2.LostEvent(source=flow_pb2.HUBBLE_RING_BUFFER, num_events_lost=3)
    )
    back = observer_pb2.ExportEvent.FromString(lost.SerializeToString())
    assert back.lost_events.num_events_lost == 3

    agent = observer_pb2.ExportEvent(agent_event=flow_pb2.AgentEvent(type=flow_pb2.AGENT_STARTED))
    seen = observer_pb2.GetFlowsResponse.FromString(agent.SerializeToString())
    assert seen.WhichOneof("response_types") is None
    assert seen.SerializeToString() == agent.SerializeToString()  # unknown field 4 is kept, not lost
