"""The protobuf decoder (`transforms.from_proto`) against the JSON decoder, and flows meant to trip it up.

- `assert_same_as_json(messages)`: serialised GetFlowsResponse messages decoded by `from_proto` give the rows,
  lost events and node status count that their `hubble observe -o jsonpb` lines give through the JSON decoder.
- `odd_flows()`: every message field of a Flow set but empty (l4, l7, IP, ethernet, endpoints, DNS/HTTP/Kafka
  inside l7, trace context, ...), every oneof member of l4 and l7 empty, empty repeated messages, and every
  enum field with numbers no Cilium defines.
- `python -m support.decoders MODE ROUNDS` (run by the tests in a child process with a timeout, so that a hang
  fails a test instead of stopping the run): decodes the odd flows over and over, alone and in large batches;
  MODE `threads` does it from several threads while gRPC threads stream flows over loopback into the decoder,
  MODE `fork` also decodes in children forked while other threads are inside the decoder, MODE `first` makes
  the process's first decoding calls from several threads at once, MODE `garbage` decodes batches of garbled
  messages (each bad one reported, the others decoded). Prints `ok`.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from google.protobuf import json_format

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe.transforms.from_proto import DecodedResponses, decode_record_batch, decode_responses
from flowpipe.transforms.normalize import normalize_json_lines

ODD_ENUM_NUMBERS = (77, 2**31 - 1, -1, -(2**31))
"""Enum numbers no Cilium defines (negative ones are ten bytes on the wire)."""


def json_line(message: bytes) -> str:
    """One serialised GetFlowsResponse as `hubble observe -o jsonpb` prints it (proto field names)."""
    response = observer_pb2.GetFlowsResponse.FromString(message)
    return json_format.MessageToJson(response, preserving_proto_field_name=True, indent=None)


def assert_same_as_json(messages: Sequence[bytes], *, cluster_name: str | None = None) -> DecodedResponses:
    """Decode `messages` with the protobuf decoder and their JSON lines with the JSON decoder; assert equal."""
    decoded = decode_responses(messages, cluster_name=cluster_name)
    text = "".join(json_line(message) + "\n" for message in messages).encode()
    reference = normalize_json_lines(text, path="responses.json", cluster_name=cluster_name)
    assert decoded.bad_messages == [] and reference.errors == [], reference.errors[:3]
    assert decoded.flows.schema == reference.flows.schema
    for name in decoded.flows.column_names:
        assert decoded.flows.column(name).equals(reference.flows.column(name)), name
    assert decoded.lost_events == reference.lost_events
    assert len(decoded.node_status) == reference.node_status
    return decoded


def _message_fields(descriptor: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], bool]]:
    """(path, repeated) of every message-typed field of `descriptor` and, for package `flow`, inside them."""
    for field in descriptor.fields:
        if field.message_type is None:
            continue
        path = (*prefix, field.name)
        yield path, field.is_repeated
        nested = field.message_type
        if not field.is_repeated and nested.full_name.startswith("flow.") and len(path) < 4:
            yield from _message_fields(nested, path)


def _enum_fields(descriptor: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for field in descriptor.fields:
        path = (*prefix, field.name)
        if field.enum_type is not None and not field.is_repeated:
            yield path
        elif (
            field.message_type is not None
            and not field.is_repeated
            and len(path) < 4
            and field.message_type.full_name.startswith("flow.")
        ):
            yield from _enum_fields(field.message_type, path)


def _parent(flow: flow_pb2.Flow, path: tuple[str, ...]) -> Any:
    target: Any = flow
    for name in path[:-1]:
        target = getattr(target, name)
    return target


def odd_flows() -> list[flow_pb2.Flow]:
    """An empty flow, then one flow per message field set but empty, then one per enum field and odd number."""
    flows = [flow_pb2.Flow()]
    for path, repeated in _message_fields(flow_pb2.Flow.DESCRIPTOR):
        flow = flow_pb2.Flow()
        field = getattr(_parent(flow, path), path[-1])
        if repeated:
            field.add()
        else:
            field.SetInParent()
        flows.append(flow)
    for path in _enum_fields(flow_pb2.Flow.DESCRIPTOR):
        for number in ODD_ENUM_NUMBERS:
            flow = flow_pb2.Flow()
            setattr(_parent(flow, path), path[-1], number)
            flows.append(flow)
    return flows


def odd_responses(node_name: str = "kind/n1") -> list[bytes]:
    """The odd flows as serialised GetFlowsResponse messages."""
    return [
        observer_pb2.GetFlowsResponse(flow=flow, node_name=node_name).SerializeToString()
        for flow in odd_flows()
    ]


# -- the child process ----------------------------------------------------------------------------------------


def _decode_rounds(messages: list[bytes], rounds: int) -> None:
    import pyarrow as pa

    binary = pa.array(messages, pa.binary())
    for _ in range(rounds):
        for message in messages:
            decode_record_batch([message])
        decode_record_batch(messages)
        decode_record_batch(binary)
        assert decode_responses(binary).flows.num_rows == len(messages)


def _stream_into_decoder(rounds: int, errors: list[BaseException]) -> None:
    """gRPC over loopback: the odd flows served by flowpipe's Observer server, read as raw bytes and decoded."""
    import grpc

    from flowpipe.server import ObserverServer

    flows = []
    for number, flow in enumerate(odd_flows()):
        flow.node_name = "kind/n1"
        flow.time.FromNanoseconds(1_700_000_000_000_000_000 + number)
        flows.append(flow.SerializeToString())
    request = observer_pb2.GetFlowsRequest(number=len(flows)).SerializeToString()
    try:
        with ObserverServer(buffer_size=len(flows)) as server:
            server.publish(flows)
            with grpc.insecure_channel(server.address) as channel:
                get_flows = channel.unary_stream("/observer.Observer/GetFlows")
                for _ in range(rounds):
                    received = list(get_flows(request, timeout=60))
                    decoded = decode_responses(received)
                    assert decoded.flows.num_rows == len(flows), decoded.flows.num_rows
    except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
        errors.append(exc)


def _first_use_from_threads(messages: list[bytes], threads: int = 4) -> None:
    """Several threads make the process's first decoding calls at once (building the decoder, its first
    conversions to pyarrow), while the main thread serialises more messages."""
    import pyarrow as pa

    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def first(index: int) -> None:
        try:
            start.wait()
            if index % 2:
                decode_responses(pa.array(messages, pa.binary()))
            else:
                decode_responses(messages)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    workers = [threading.Thread(target=first, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    odd_responses()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


def garbled(messages: Sequence[bytes], count: int, seed: int = 7) -> list[bytes]:
    """`count` messages made from `messages` by a changed, inserted or cut byte, bytes of the wire format's
    markers (continuation, group, invalid wire types) or random bytes: most are not valid protobuf."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        message = bytearray(rng.choice(messages))
        how = rng.randrange(5)
        if how == 0 and message:
            message[rng.randrange(len(message))] = rng.randrange(256)
        elif how == 1:
            del message[rng.randrange(len(message) + 1) :]
        elif how == 2:
            message.insert(rng.randrange(len(message) + 1), rng.randrange(256))
        elif how == 3:
            message = bytearray(rng.randbytes(rng.randrange(40)))
        else:
            for _ in range(3):
                if message:
                    message[rng.randrange(len(message))] = rng.choice([0xFF, 0x80, 0x00, 0x0B, 0x0C, 0x0F])
        out.append(bytes(message))
    return out


def _garbage(messages: list[bytes], rounds: int) -> None:
    """Batches with garbled messages: each bad one is reported (and fails alone), every other one decodes."""
    for round_ in range(rounds):
        batch = garbled(messages, 500, seed=round_)
        decoded = decode_responses(batch)
        bad = {index for index, _ in decoded.bad_messages}
        assert 0 < len(bad) < len(batch)
        for index, message in enumerate(batch):
            try:
                decode_record_batch([message])
            except Exception:  # noqa: BLE001
                assert index in bad, index
            else:
                assert index not in bad, index
        good = [message for index, message in enumerate(batch) if index not in bad]
        assert decoded.flows.equals(decode_responses(good).flows)


def main(mode: str, rounds: int) -> None:
    messages = odd_responses()
    if mode == "first":
        _first_use_from_threads(messages)
        print("ok", flush=True)
        return
    if mode == "garbage":
        _garbage(messages, rounds)
        print("ok", flush=True)
        return
    _decode_rounds(messages, 1)
    large = messages * max(1, 100_000 // len(messages))
    assert decode_responses(large).flows.num_rows == len(large)
    if mode == "alone":
        _decode_rounds(messages, rounds)
    elif mode in ("threads", "fork"):
        errors: list[BaseException] = []

        def decode() -> None:
            try:
                _decode_rounds(messages, rounds)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=decode) for _ in range(3)]
        threads.append(threading.Thread(target=_stream_into_decoder, args=(rounds, errors)))
        for thread in threads:
            thread.start()
        if mode == "fork":
            for _ in range(rounds):
                pid = os.fork()
                if pid == 0:  # the child decodes whatever state the other threads left the decoder in
                    signal.alarm(60)  # a child that hangs ends (SIGALRM) and fails the parent's check
                    _decode_rounds(messages, 1)
                    os._exit(0)
                _, status = os.waitpid(pid, 0)
                assert status == 0, f"a forked child ended with status {status}"
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print("ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
