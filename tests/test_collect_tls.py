"""`flowpipe collect` over TLS and mutual TLS against the built-in relay.

What connects, what is refused, and that every refusal says why (TLS is never given up for plaintext).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from support.collect import (
    RECEIVING_MODES,
    background_collect,
    dataset_uuids,
    fast_collect_config,
    sim_flow_bytes,
    uuids_of,
)
from support.wait import wait_until

from flowpipe.cli import cli
from flowpipe.server import ObserverServer, TestPKI, generate_test_pki

FLOWS = 300


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return generate_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_relay(pki: TestPKI) -> Iterator[ObserverServer]:
    with ObserverServer(tls=pki.server_tls(mutual=True)) as server:
        server.publish(sim_flow_bytes()[:FLOWS])
        yield server


@pytest.fixture(scope="module")
def plain_relay() -> Iterator[ObserverServer]:
    with ObserverServer() as server:
        server.publish(sim_flow_bytes()[:FLOWS])
        yield server


def collects_everything(
    address: str, dataset: Path, workers: int | None = None, receiver: str = "http2", **tls: str
) -> None:
    config = fast_collect_config(address, dataset, workers=workers, receiver=receiver, **tls)
    with background_collect(config) as run:
        wait_until(lambda: len(dataset_uuids(dataset)) == FLOWS, what="the flows over TLS")
        run.stop()
    assert sorted(dataset_uuids(dataset)) == sorted(uuids_of(sim_flow_bytes()[:FLOWS]))


def refused(address: str, dataset: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(
        cli,
        ["collect", "--relay", address, "--dataset", str(dataset), "--metrics-address", "off", *args],
        env=env,
    )
    assert result.exit_code == 1, result.output
    assert not dataset_uuids(dataset), "nothing was collected"
    return result.output


@pytest.mark.parametrize(("workers", "receiver"), RECEIVING_MODES)
def test_mutual_tls_with_the_right_client_certificate_collects(
    mtls_relay: ObserverServer, pki: TestPKI, tmp_path: Path, workers: int, receiver: str
) -> None:
    collects_everything(
        mtls_relay.address,
        tmp_path,
        workers,
        receiver,
        tls_ca=str(pki.ca_cert),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
        tls_server_name=pki.server_name,
    )


def test_tls_without_a_server_name_verifies_the_address(pki: TestPKI, tmp_path: Path) -> None:
    with ObserverServer(tls=pki.server_tls(mutual=False)) as server:  # the certificate names 127.0.0.1 too
        server.publish(sim_flow_bytes()[:FLOWS])
        collects_everything(server.address, tmp_path, tls_ca=str(pki.ca_cert))


def test_mutual_tls_without_a_client_certificate_is_refused(
    mtls_relay: ObserverServer, pki: TestPKI, tmp_path: Path
) -> None:
    output = refused(
        mtls_relay.address, tmp_path, "--tls-ca", str(pki.ca_cert), "--tls-server-name", pki.server_name
    )
    assert "requires a client certificate (mutual TLS); pass --tls-cert and --tls-key" in output


def test_a_client_certificate_from_another_ca_is_refused(
    mtls_relay: ObserverServer, pki: TestPKI, tmp_path: Path
) -> None:
    output = refused(
        mtls_relay.address, tmp_path, "--tls-ca", str(pki.ca_cert), "--tls-server-name", pki.server_name,
        "--tls-cert", str(pki.other_client_cert), "--tls-key", str(pki.other_client_key),
    )  # fmt: skip
    assert "did not accept the client certificate" in output and str(pki.other_client_cert) in output


def test_a_server_name_mismatch_is_refused(mtls_relay: ObserverServer, pki: TestPKI, tmp_path: Path) -> None:
    output = refused(
        mtls_relay.address, tmp_path, "--tls-ca", str(pki.ca_cert), "--tls-cert", str(pki.client_cert),
        "--tls-key", str(pki.client_key),
        env={"FLOWPIPE_TLS_SERVER_NAME": "relay.elsewhere.test"},  # read from the environment
    )  # fmt: skip
    assert "is not valid for the name 'relay.elsewhere.test'" in output and "--tls-server-name" in output


def test_a_relay_certificate_from_another_ca_is_refused(
    mtls_relay: ObserverServer, pki: TestPKI, tmp_path: Path
) -> None:
    output = refused(
        mtls_relay.address, tmp_path, "--tls-ca", str(pki.other_ca_cert), "--tls-server-name", pki.server_name,
        "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key),
    )  # fmt: skip
    assert "is not trusted" in output and "check --tls-ca" in output


def test_tls_to_a_plaintext_relay_is_an_error_not_a_fallback(
    plain_relay: ObserverServer, pki: TestPKI, tmp_path: Path
) -> None:
    output = refused(plain_relay.address, tmp_path, "--tls-ca", str(pki.ca_cert))
    assert "does not speak TLS (it answered in plaintext) but TLS was asked for" in output


def test_plaintext_to_a_tls_relay_is_an_error(mtls_relay: ObserverServer, tmp_path: Path) -> None:
    output = refused(mtls_relay.address, tmp_path)
    assert "speaks TLS but a plaintext connection was asked for: pass --tls-ca" in output


def test_a_missing_key_file_is_named(mtls_relay: ObserverServer, pki: TestPKI, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["collect", "--relay", mtls_relay.address, "--dataset", str(tmp_path), "--metrics-address", "off",
         "--tls-ca", str(pki.ca_cert), "--tls-cert", str(pki.client_cert), "--tls-key", str(tmp_path / "nope.key")],
    )  # fmt: skip
    assert result.exit_code == 2 and "cannot read the client key (--tls-key)" in result.output


@pytest.mark.parametrize(
    ("which", "expected"),
    [("expired_server_cert", "expired on"), ("future_server_cert", "is not valid before")],
)
def test_a_relay_certificate_outside_its_validity_says_so_and_when(
    pki: TestPKI, tmp_path: Path, which: str, expected: str
) -> None:
    certificate = getattr(pki, which)
    with ObserverServer(tls=pki.server_tls(mutual=False, cert=certificate)) as server:
        output = refused(server.address, tmp_path, "--tls-ca", str(pki.ca_cert))
    when = x509.load_pem_x509_certificate(certificate.read_bytes())
    moment = when.not_valid_after_utc if which == "expired_server_cert" else when.not_valid_before_utc
    assert f"the certificate of {server.address} {expected} {moment:%Y-%m-%d %H:%M:%S} UTC" in output, output
    assert "not trusted" not in output and "not signed by" not in output


def test_grpc_log_lines_stay_off_stderr_unless_debugging(pki: TestPKI, tmp_path: Path) -> None:
    def collect(*options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flowpipe", *options, "collect", "--relay", server.address,
             "--tls-ca", str(pki.ca_cert), "--metrics-address", "off", "--dataset", str(tmp_path)],
            capture_output=True, text=True, check=False,
            env={key: value for key, value in os.environ.items() if not key.startswith("GRPC_")},
        )  # fmt: skip

    with ObserverServer(tls=pki.server_tls(mutual=False, cert=pki.expired_server_cert)) as server:
        quiet, debug = collect(), collect("--log-level", "debug")
    assert quiet.returncode == 1 and "expired on" in quiet.stderr
    assert quiet.stderr.splitlines()[-1].startswith("Error: "), quiet.stderr
    assert "ssl_transport_security" not in quiet.stderr and "andshake" not in quiet.stderr, quiet.stderr
    assert debug.returncode == 1 and "ssl_transport_security" in debug.stderr  # gRPC's own view, when asked
