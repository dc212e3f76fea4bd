"""TLS and mutual TLS of the built-in Observer server, with a generated test PKI, over real gRPC on 127.0.0.1."""

from __future__ import annotations

import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from support.processes import start_simulate_relay, stop_process

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2, observer_pb2_grpc
from flowpipe.errors import ObserverServerError
from flowpipe.server import ObserverServer, ServerTLSConfig, TestPKI, generate_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return generate_test_pki(tmp_path_factory.mktemp("pki"))


def one_flow() -> flow_pb2.Flow:
    flow = flow_pb2.Flow(node_name="node-a", uuid="tls-flow", verdict=flow_pb2.FORWARDED)
    flow.time.FromSeconds(1_700_000_000)
    return flow


@pytest.fixture(scope="module")
def mtls_server(pki: TestPKI) -> Iterator[ObserverServer]:
    with ObserverServer(tls=pki.server_tls(mutual=True)) as server:
        server.publish([one_flow()])
        yield server


@pytest.fixture(scope="module")
def tls_server(pki: TestPKI) -> Iterator[ObserverServer]:
    with ObserverServer(tls=pki.server_tls(mutual=False)) as server:
        server.publish([one_flow()])
        yield server


def fetch_uuids(
    server: ObserverServer,
    ca: Path | None,
    cert: Path | None = None,
    key: Path | None = None,
    server_name: str | None = None,
) -> list[str]:
    """GetFlows over TLS with the given client material (ca None = plaintext)."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if ca is None:
        channel = grpc.insecure_channel(server.address)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
        channel = grpc.secure_channel(server.address, credentials, options=options)
    with channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        responses = stub.GetFlows(observer_pb2.GetFlowsRequest(), timeout=10)
        return [r.flow.uuid for r in responses if r.HasField("flow")]


def refused(call: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    code: grpc.StatusCode = info.value.code()
    return code


def test_generated_pki_files(pki: TestPKI) -> None:
    server_cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert pki.server_name in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    other_ca = x509.load_pem_x509_certificate(pki.other_ca_cert.read_bytes())
    client_cert = x509.load_pem_x509_certificate(pki.client_cert.read_bytes())
    assert client_cert.issuer == ca_cert.subject and other_ca.subject != ca_cert.subject
    assert stat.S_IMODE(pki.client_key.stat().st_mode) == 0o600


def test_tls_with_the_ca_connects(tls_server: ObserverServer, pki: TestPKI) -> None:
    assert fetch_uuids(tls_server, pki.ca_cert) == ["tls-flow"]
    assert fetch_uuids(tls_server, pki.ca_cert, server_name=pki.server_name) == ["tls-flow"]


def test_plaintext_client_is_refused_by_a_tls_server(tls_server: ObserverServer) -> None:
    assert refused(fetch_uuids, tls_server, None) == grpc.StatusCode.UNAVAILABLE


def test_tls_client_is_refused_by_a_plaintext_server(pki: TestPKI) -> None:
    with ObserverServer() as plain:
        assert refused(fetch_uuids, plain, pki.ca_cert) == grpc.StatusCode.UNAVAILABLE


def test_server_certificate_from_another_ca_is_refused(tls_server: ObserverServer, pki: TestPKI) -> None:
    assert refused(fetch_uuids, tls_server, pki.other_ca_cert) == grpc.StatusCode.UNAVAILABLE


def test_server_name_mismatch_is_refused(tls_server: ObserverServer, pki: TestPKI) -> None:
    assert (
        refused(fetch_uuids, tls_server, pki.ca_cert, server_name="wrong.flowpipe.test")
        == grpc.StatusCode.UNAVAILABLE
    )


def test_mtls_with_the_right_client_certificate_connects(mtls_server: ObserverServer, pki: TestPKI) -> None:
    assert fetch_uuids(mtls_server, pki.ca_cert, pki.client_cert, pki.client_key, pki.server_name) == [
        "tls-flow"
    ]


def test_mtls_without_a_client_certificate_is_refused(mtls_server: ObserverServer, pki: TestPKI) -> None:
    assert refused(fetch_uuids, mtls_server, pki.ca_cert) == grpc.StatusCode.UNAVAILABLE


def test_mtls_with_a_client_certificate_from_another_ca_is_refused(
    mtls_server: ObserverServer, pki: TestPKI
) -> None:
    code = refused(fetch_uuids, mtls_server, pki.ca_cert, pki.other_client_cert, pki.other_client_key)
    assert code == grpc.StatusCode.UNAVAILABLE


def test_mtls_server_name_mismatch_is_refused(mtls_server: ObserverServer, pki: TestPKI) -> None:
    code = refused(fetch_uuids, mtls_server, pki.ca_cert, pki.client_cert, pki.client_key, "other.example")
    assert code == grpc.StatusCode.UNAVAILABLE


def test_missing_certificate_files_are_a_clear_error(tmp_path: Path) -> None:
    config = ServerTLSConfig(tmp_path / "missing.crt", tmp_path / "missing.key")
    with pytest.raises(ObserverServerError, match="missing.crt"):
        config.ssl_context()


def test_simulate_relay_generates_a_pki_and_serves_mutual_tls(tmp_path: Path) -> None:

    directory = tmp_path / "relay-pki"
    process, address = start_simulate_relay(
        "--backlog", "10s", "--rate", "50", "--tls-generate", str(directory)
    )
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(directory / "ca.crt").read_bytes(),
            private_key=(directory / "client.key").read_bytes(),
            certificate_chain=(directory / "client.crt").read_bytes(),
        )
        options = [("grpc.ssl_target_name_override", "relay.flowpipe.test")]
        with grpc.secure_channel(address, credentials, options=options) as channel:
            stub = observer_pb2_grpc.ObserverStub(channel)
            assert (
                stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10).num_connected_nodes.value
                == 4
            )
        with grpc.secure_channel(
            address, grpc.ssl_channel_credentials((directory / "ca.crt").read_bytes()), options=options
        ) as channel:
            with pytest.raises(grpc.RpcError) as info:
                observer_pb2_grpc.ObserverStub(channel).ServerStatus(
                    observer_pb2.ServerStatusRequest(), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert stop_process(process, signal.SIGINT) == 0
