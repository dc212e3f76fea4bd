"""gRPC reflection on the built-in Observer server: what grpcurl needs to list, describe and call it."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from flowpipe._proto.observer import observer_pb2
from flowpipe.server import ObserverServer

V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


@pytest.fixture
def channel() -> Iterator[grpc.Channel]:
    with ObserverServer() as server, grpc.insecure_channel(server.address) as chan:
        yield chan


Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


def ask(channel: grpc.Channel, path: str, *requests: Request) -> list[Response]:
    """Several requests on one bidirectional stream, as grpcurl sends them."""
    call = channel.stream_stream(
        path,
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    return list(call(iter(requests), timeout=10))


def test_a_reflection_client_rebuilds_the_observer_service_without_proto_files(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    assert "observer.Observer" in database.get_services()
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("observer.Observer")
    methods = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}
    assert methods["GetFlows"] == ("observer.GetFlowsRequest", "observer.GetFlowsResponse")
    assert set(methods) == {m.name for m in observer_pb2.DESCRIPTOR.services_by_name["Observer"].methods}
    flow = pool.FindMessageTypeByName("flow.Flow")
    assert flow.fields_by_name["is_reply"].message_type.full_name == "google.protobuf.BoolValue"


def descriptors(response: Response) -> list[descriptor_pb2.FileDescriptorProto]:
    raw = response.file_descriptor_response.file_descriptor_proto
    return [descriptor_pb2.FileDescriptorProto.FromString(b) for b in raw]


@pytest.mark.parametrize("path", [V1ALPHA, V1])
def test_several_requests_on_one_stream_each_get_their_answer(channel: grpc.Channel, path: str) -> None:
    listed, by_symbol, by_file, missing = ask(
        channel,
        path,
        Request(list_services=""),
        Request(file_containing_symbol="observer.GetFlowsRequest"),
        Request(file_by_filename="flow/flow.proto"),
        Request(file_containing_symbol="no.Such"),
    )
    assert {s.name for s in listed.list_services_response.service} == {
        "observer.Observer",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    names = [file.name for file in descriptors(by_symbol)]
    assert names[0] == "observer/observer.proto" and len(names) == len(set(names))
    assert {"flow/flow.proto", "relay/relay.proto", "google/protobuf/timestamp.proto"} <= set(names)
    assert by_symbol.original_request.file_containing_symbol == "observer.GetFlowsRequest"
    first = descriptors(by_file)[0]
    assert first.name == "flow/flow.proto" and first.package == "flow"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_a_request_that_is_not_a_reflection_message_ends_the_stream(channel: grpc.Channel) -> None:
    call = channel.stream_stream(V1ALPHA)
    with pytest.raises(grpc.RpcError) as info:
        list(call(iter([b"\xff\xff\xff"]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
