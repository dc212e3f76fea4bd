"""Connecting to hubble-relay: gRPC channels (plaintext, TLS, mutual TLS), error translation and diagnosis.

grpcio reports most connection problems as UNAVAILABLE with a transport message that rarely says what is
wrong. When a call fails, `diagnose` looks at the address itself with plain sockets and `ssl`, the way a person
would with `openssl s_client` and `curl`: does the name resolve, does the port accept connections, does the
server speak TLS or plaintext, does it accept our client certificate, is its certificate valid for the name,
does it answer in HTTP/1 instead of HTTP/2. Its answer names the address and what to change. TLS is never
given up for plaintext: a TLS problem is reported as one.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from flowpipe.errors import ConfigError, RelayError, RelayUnavailableError
from flowpipe.sources.relay._address import (
    MAX_MESSAGE_BYTES,
    RECEIVE_WINDOW_BYTES,
    RelayTLS,
    split_address,
    tls_context,
)
from flowpipe.sources.relay._h2call import FlowsCall

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""Codes that say "not now" rather than "never": the source backs off and retries them."""

_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def open_channel(address: str, tls: RelayTLS | None) -> grpc.Channel:
    """A gRPC channel to the relay. Streaming calls run on the caller's thread (fewer thread handoffs per
    message); the receive window is fixed at `RECEIVE_WINDOW_BYTES` (BDP probing off, which would grow it
    without a bound a reader that is behind could rely on), and so is the largest DATA frame the relay may send."""
    split_address(address)
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW_BYTES),
        # frames as large as the window: a server that honours it (the built-in one) writes a few large DATA
        # frames where 16 KiB ones cost it a frame each ~15 flows (grpc-go servers keep to 16 KiB anyway)
        ("grpc.http2.max_frame_size", RECEIVE_WINDOW_BYTES),
        # grpc-go servers (hubble-relay) close connections that ping more often than every 5 minutes.
        ("grpc.keepalive_time_ms", 300_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.enable_retries", 0),
        ("grpc.primary_user_agent", "flowpipe"),
    ]
    import grpc.experimental

    options.append((grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1))
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_path, "CA certificate (--tls-ca)") if tls.ca_path else None,
        private_key=_read(tls.key_path, "client key (--tls-key)") if tls.key_path else None,
        certificate_chain=_read(tls.cert_path, "client certificate (--tls-cert)") if tls.cert_path else None,
    )
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, credentials, options=options)


def status_code(exc: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call (UNKNOWN when grpcio gives none)."""
    code = exc.code() if hasattr(exc, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def status_details(exc: grpc.RpcError) -> str:
    """The status message of a failed call."""
    details = exc.details() if hasattr(exc, "details") else None
    return str(details or exc)


def relay_error(address: str, exc: grpc.RpcError, *, what: str = "") -> RelayError:
    """A failed call as RelayUnavailableError (retryable) or RelayError, naming the address and code."""
    code = status_code(exc)
    cls = RelayUnavailableError if code in RETRYABLE_CODES else RelayError
    prefix = f"{what}: " if what else ""
    return cls(
        f"hubble-relay {address}: {prefix}{code.name}: {status_details(exc)}", address=address, code=code.name
    )


@contextmanager
def translate_grpc_errors(address: str, what: str = "") -> Iterator[None]:
    """Turn `grpc.RpcError` raised inside into RelayError / RelayUnavailableError (`raise ... from`)."""
    try:
        yield
    except grpc.RpcError as exc:
        raise relay_error(address, exc, what=what) from exc


# -- diagnosis --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """What is wrong with an address, in words, and whether waiting may fix it (the relay not up yet)."""

    message: str
    retryable: bool
    kind: str


def _connect(host: str, port: int, timeout: float) -> socket.socket | Diagnosis:
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return Diagnosis(
            f"cannot resolve the relay host {host!r} ({exc.strerror}): check --relay", True, "resolve"
        )
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    if isinstance(last, ConnectionRefusedError):
        return Diagnosis(
            f"nothing listens on {where} (connection refused): check the port in --relay", True, "refused"
        )
    if isinstance(last, TimeoutError):
        return Diagnosis(
            f"no answer from {where} within {timeout:g}s: wrong address, or a firewall drops it",
            True,
            "timeout",
        )
    reason = (last.strerror if last is not None else None) or str(last)
    return Diagnosis(f"cannot connect to {where}: {reason}", True, "connect")


def _recv_some(sock: socket.socket | ssl.SSLSocket, limit: int = 64) -> bytes:
    try:
        return sock.recv(limit)
    except TimeoutError:
        return b""


def _http_kind(answer: bytes) -> str:
    """`http1`, `http2`, `tls` or `unknown` from the first bytes a server sent back to an HTTP/2 preface."""
    if b"HTTP/1." in answer[:16] or answer.lstrip()[:1] == b"<":  # a status line, or an HTTP/0.9-style page
        return "http1"
    if answer[:1] in (b"\x15", b"\x16") and answer[1:2] == b"\x03":
        return "tls"
    if len(answer) >= 9 and answer[3] == 0x04:  # an HTTP/2 frame header of type SETTINGS
        return "http2"
    return "unknown"


def _speaks_tls(host: str, port: int, deadline: float) -> bool:
    sock = _connect(host, port, _left(deadline))
    if isinstance(sock, Diagnosis):
        return False
    try:
        sock.settimeout(_left(deadline))
        with tls_context(None, verify=False).wrap_socket(sock, server_hostname=host):
            return True
    except (OSError, ssl.SSLError):
        return False
    finally:
        sock.close()


def _left(deadline: float) -> float:
    """Seconds until `deadline` (a `time.monotonic()` value), at least a little: a socket timeout."""
    return max(0.01, deadline - time.monotonic())


def _silent(where: str, timeout: float) -> Diagnosis:
    return Diagnosis(
        f"{where} accepted the connection but answered nothing within {round(timeout, 1):g}s: is it a Hubble relay (and "
        "up)? check --relay",
        True,
        "silent",
    )


def diagnose(address: str, tls: RelayTLS | None, *, timeout: float = 5.0) -> Diagnosis | None:
    """Find out with plain sockets why a connection to `address` fails; None when the transport looks fine.

    `timeout` bounds the whole diagnosis (every connection and read it makes)."""
    deadline = time.monotonic() + timeout
    host, port = split_address(address)
    where = f"{address}"
    sock = _connect(host, port, timeout)
    if isinstance(sock, Diagnosis):
        return sock
    try:
        sock.settimeout(_left(deadline))
        if tls is None:
            return _diagnose_plaintext(sock, host, port, where, deadline, timeout)
        return _diagnose_tls(sock, host, where, tls, timeout)
    finally:
        sock.close()


def _diagnose_plaintext(
    sock: socket.socket, host: str, port: int, where: str, deadline: float, timeout: float
) -> Diagnosis | None:
    silent = False
    try:
        sock.sendall(_HTTP2_PREFACE)
        answer = sock.recv(64)
    except TimeoutError:
        answer, silent = b"", True
    except OSError:
        answer = b""
    if silent:
        return _silent(where, timeout)
    kind = _http_kind(answer)
    if kind == "http2":
        return None
    if kind == "http1":
        first = answer.split(b"\n", 1)[0].strip().decode("latin-1", "replace")[:60]
        return Diagnosis(
            f"{where} is an HTTP/1 server (it answered {first!r}), not a gRPC Hubble relay: check --relay",
            False,
            "http1",
        )
    if kind == "tls" or _speaks_tls(host, port, deadline):
        return Diagnosis(
            f"{where} speaks TLS but a plaintext connection was asked for: pass --tls-ca (and --tls-cert/--tls-key "
            "when the relay requires client certificates), or use the relay's plaintext port",
            False,
            "tls_expected",
        )
    return Diagnosis(f"{where} does not speak HTTP/2 (gRPC): check --relay", False, "not_grpc")


_TLS_PLAINTEXT_REASONS = (
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
)


def _diagnose_tls(
    sock: socket.socket, host: str, where: str, tls: RelayTLS, timeout: float
) -> Diagnosis | None:
    name = tls.server_name or host
    try:
        context = tls_context(tls, verify=True)
    except (OSError, ssl.SSLError) as exc:
        return Diagnosis(
            f"cannot load the TLS files (--tls-ca/--tls-cert/--tls-key): {exc}", False, "tls_files"
        )
    try:
        wrapped = context.wrap_socket(sock, server_hostname=name)
    except ssl.SSLCertVerificationError as exc:
        return _verification_failure(exc, where, name, tls, timeout)
    except ssl.SSLError as exc:
        return _handshake_failure(exc, where, tls)
    except TimeoutError:
        return _silent(where, timeout)
    except (ConnectionResetError, BrokenPipeError, EOFError) as exc:
        return Diagnosis(
            f"{where} closed the connection during the TLS handshake ({exc}): it may not speak TLS, or it rejected "
            "the handshake; check --relay and the --tls-* options",
            False,
            "tls_failed",
        )
    except OSError as exc:
        return Diagnosis(f"TLS handshake with {where} failed: {exc}", False, "tls_failed")
    try:
        # TLS 1.3 servers check the client certificate after the handshake: the verdict comes with the first read.
        wrapped.sendall(_HTTP2_PREFACE)
        answer = _recv_some(wrapped)
    except ssl.SSLError as exc:
        return _handshake_failure(exc, where, tls)
    except OSError as exc:
        return Diagnosis(f"{where} closed the TLS connection: {exc}", False, "tls_failed")
    finally:
        wrapped.close()
    if not answer:
        # The server closed the connection right after the handshake: it did not accept us as a client.
        if tls.mutual:
            return Diagnosis(
                f"{where} closed the connection after the TLS handshake: it did not accept the client certificate "
                f"{tls.cert_path} (it must be signed by a CA the relay trusts)",
                False,
                "tls_client_rejected",
            )
        return Diagnosis(
            f"{where} closed the connection after the TLS handshake: it requires a client certificate (mutual TLS); "
            "pass --tls-cert and --tls-key",
            False,
            "tls_client_cert",
        )
    if wrapped.selected_alpn_protocol() not in (None, "h2") or _http_kind(answer) == "http1":
        return Diagnosis(
            f"{where} speaks HTTPS/1, not gRPC: it is not a Hubble relay; check --relay", False, "http1"
        )
    return None


_CERT_NOT_YET_VALID, _CERT_HAS_EXPIRED = 9, 10
"""OpenSSL's verify codes (X509_V_ERR_*) for a certificate outside its validity period."""


def _verification_failure(
    exc: ssl.SSLCertVerificationError, where: str, name: str, tls: RelayTLS, timeout: float
) -> Diagnosis:
    detail = exc.verify_message or str(exc)
    if (
        exc.verify_code in (_CERT_NOT_YET_VALID, _CERT_HAS_EXPIRED)
        or "valid" in detail
        or "expired" in detail
    ):
        found = _validity_failure(where, name, tls, timeout)
        if found is not None:
            return found
    if "mismatch" in detail.lower() or "hostname" in detail.lower():
        return Diagnosis(
            f"the certificate of {where} is not valid for the name {name!r} ({detail}): set --tls-server-name to a "
            "name the certificate holds (hubble-relay's is *.hubble-relay.cilium.io)",
            False,
            "tls_name",
        )
    ca = tls.ca_path or "the system's trusted CAs"
    return Diagnosis(
        f"the certificate of {where} is not trusted ({detail}): it is not signed by {ca}; check --tls-ca",
        False,
        "tls_untrusted",
    )


def _validity_failure(where: str, name: str, tls: RelayTLS, timeout: float) -> Diagnosis | None:
    """Which certificate is outside its validity period, and since or until when: the relay's (read again
    without verifying it) or a CA of --tls-ca. None when neither is (or the relay's cannot be read)."""
    from cryptography import x509

    host, port = split_address(where)
    certificates: list[tuple[str, x509.Certificate]] = []
    sock = _connect(host, port, timeout)
    if not isinstance(sock, Diagnosis):
        try:
            with tls_context(None, verify=False).wrap_socket(sock, server_hostname=name) as wrapped:
                der = wrapped.getpeercert(binary_form=True)
            if der:
                certificates.append((f"the certificate of {where}", x509.load_der_x509_certificate(der)))
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            sock.close()
    if tls.ca_path:
        try:
            cas = x509.load_pem_x509_certificates(Path(tls.ca_path).read_bytes())
        except (OSError, ValueError):
            cas = []
        certificates += [(f"the CA certificate {tls.ca_path} ({_common_name(ca)})", ca) for ca in cas]
    now = datetime.now(UTC)
    for what, certificate in certificates:
        until, since = certificate.not_valid_after_utc, certificate.not_valid_before_utc
        if now > until:
            return Diagnosis(
                f"{what} expired on {until:%Y-%m-%d %H:%M:%S} UTC ({_ago(now - until)} ago): renew it (or, if "
                f"it is current, check this machine's clock: {now:%Y-%m-%d %H:%M:%S} UTC)",
                False,
                "tls_expired",
            )
        if now < since:
            return Diagnosis(
                f"{what} is not valid before {since:%Y-%m-%d %H:%M:%S} UTC (in {_ago(since - now)}): check this "
                f"machine's clock ({now:%Y-%m-%d %H:%M:%S} UTC) and the issuer's",
                False,
                "tls_not_yet_valid",
            )
    return None


def _common_name(certificate: Any) -> str:
    from cryptography.x509.oid import NameOID

    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.subject.rfc4514_string()


def _ago(delta: timedelta) -> str:
    """A duration in words, to the largest whole unit: `3 days`, `5 hours`, `42 minutes`."""
    seconds = int(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def _handshake_failure(exc: ssl.SSLError, where: str, tls: RelayTLS) -> Diagnosis:
    reason = (exc.reason or "").upper()
    text = f"{reason} {exc}".upper()
    if any(marker in text for marker in _TLS_PLAINTEXT_REASONS):
        return Diagnosis(
            f"{where} does not speak TLS (it answered in plaintext) but TLS was asked for (--tls-*): use the relay's "
            "TLS port, or drop the --tls-* options if the relay really serves plaintext",
            False,
            "plaintext_server",
        )
    if "CERTIFICATE_REQUIRED" in text or ("HANDSHAKE_FAILURE" in text and not tls.mutual):
        return Diagnosis(
            f"{where} requires a client certificate (mutual TLS): pass --tls-cert and --tls-key",
            False,
            "tls_client_cert",
        )
    if any(m in text for m in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR")):
        return Diagnosis(
            f"{where} rejected the client certificate {tls.cert_path} ({reason or exc}): it must be signed by a CA the "
            "relay trusts (hubble-relay's client CA)",
            False,
            "tls_client_rejected",
        )
    return Diagnosis(f"TLS handshake with {where} failed: {reason or exc}", False, "tls_failed")


def explain_call_error(
    address: str, tls: RelayTLS | None, exc: grpc.RpcError, method: str, *, timeout: float
) -> RelayError:
    """A failed unary call of observer.Observer as the error to raise: not a Hubble relay (UNIMPLEMENTED), what
    `diagnose` finds for a transport failure (RelayUnavailableError only when waiting may help), else
    `relay_error`."""
    code = status_code(exc)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return RelayError(
            f"{address} answers gRPC but is not a Hubble relay: observer.Observer/{method} is not implemented "
            "(check --relay: hubble-relay listens on 4245, its Service on 80, or 443 with TLS)",
            address=address,
            code=code.name,
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.INTERNAL):  # fmt: skip
        found = diagnose(address, tls, timeout=timeout)
        if found is not None:
            cls = RelayUnavailableError if found.retryable else RelayError
            return cls(f"hubble-relay {address}: {found.message}", address=address, code=code.name)
    return relay_error(address, exc, what=method)


class StreamReceiver(threading.Thread):
    """Reads one GetFlows call into a bounded queue of raw response bytes.

    One thread appends (this one), one takes (the source): a deque needs no lock for that, so the per-message
    path is an append and a length check. Two events carry the rare signals: `ready` when a batch is waiting
    or the call is over, `room` when the taker has made space under `max_pending` again.
    """

    def __init__(self, call: Any, max_pending: int, on_first: Callable[[], None]) -> None:
        super().__init__(name="flowpipe-relay-receiver", daemon=True)
        self.call = call
        self.max_pending = max_pending
        self.on_first = on_first
        self.queue: deque[bytes] = deque()
        self.ready = threading.Event()
        self.room = threading.Event()
        self.room.set()
        self.wake_at = 1
        self.done = False
        self.stopping = False
        self.error: BaseException | None = None

    def run(self) -> None:
        queue, append, limit = self.queue, self.queue.append, self.max_pending
        ready, room = self.ready, self.room
        first = True
        try:
            for message in self.call:
                if first:
                    first = False
                    self.on_first()
                append(message)
                size = len(queue)
                if size >= self.wake_at and not ready.is_set():
                    ready.set()
                if size >= limit:
                    room.clear()
                    while len(queue) >= limit and not self.stopping:
                        room.wait(0.1)  # backpressure: the relay's stream waits (HTTP/2 flow control)
                if self.stopping:
                    break
        except BaseException as exc:  # noqa: BLE001  (handed to the decoding side)
            self.error = exc
        finally:
            self.done = True
            ready.set()

    def take(self, count: int, wait_seconds: float, stop: threading.Event) -> tuple[list[bytes], bool]:
        """Wait up to `wait_seconds` for `count` messages (fewer once the time is up, or once the queue is full
        at `max_pending`: it grows no further); returns at most `count` of them and whether the call is over
        (and nothing is left)."""
        deadline = time.monotonic() + wait_seconds
        queue = self.queue
        self.wake_at = want = min(count, self.max_pending)
        while not self.done and not stop.is_set() and len(queue) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.ready.clear()
            if self.done or len(queue) >= want:  # arrived between the test above and the clear
                break
            self.ready.wait(min(left, 0.1))
        done = self.done  # read first: once set, nothing more is appended
        taken = [queue.popleft() for _ in range(min(count, len(queue)))]
        self.room.set()
        return taken, done and not taken and not queue

    def stop(self) -> None:
        """End the call (from another thread); the receiver finishes soon after."""
        self.stopping = True
        self.room.set()
        self.call.cancel()


class CallError(grpc.RpcError):
    """How a GetFlows call read over HTTP/2 (`_h2call`, in this process or the receiving one) ended: its status
    code and details, as grpcio's."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        """The call's status code."""
        return self._code

    def details(self) -> str:
        """The call's status message."""
        return self._details


class CallMessages:
    """A GetFlows call read over HTTP/2 (`_h2call.FlowsCall`) as grpcio's streaming call: iterating gives the raw
    response messages, and raises `CallError` when the call ends with a status other than OK; `cancel()` may be
    called from another thread. The connection is made by the iterating thread, on its first step."""

    def __init__(self, address: str, tls: RelayTLS | None, path: str, request: bytes) -> None:
        self._open = (address, tls, path, request)
        self._call: FlowsCall | None = None
        self._cancelled = False

    def __iter__(self) -> Iterator[bytes]:
        if self._cancelled:
            raise CallError(grpc.StatusCode.CANCELLED, "cancelled before it started")
        call = self._call = FlowsCall(*self._open)
        if self._cancelled:
            call.interrupt()
        try:
            while call.status is None:
                yield from call.read(0.5)
        finally:
            if call.status is None:  # the reader stopped iterating: end the call and close its connection
                call.cancel()
        code, details = call.status
        if code != "OK":
            raise CallError(grpc.StatusCode[code], details)

    def cancel(self) -> None:
        """End the call (the iterating thread sees it end as CANCELLED)."""
        self._cancelled = True
        if self._call is not None:
            self._call.interrupt()


def library_call(channel: grpc.Channel, path: str, request: bytes) -> Any:
    """A GetFlows call read by grpcio itself (`collect --receiver grpcio`), as `CallMessages` is read: iterating
    gives the raw response messages (no deserializer: bytes, decoded in bulk later), a status other than OK is
    raised as grpcio's `RpcError` with grpcio's code, and `cancel()` may be called from another thread.

    It costs several microseconds a message (a completion-queue event and a Python object each, on the
    iterating thread with `open_channel`'s options) where `CallMessages` costs a slice: it is the library
    client, for relays or proxies `_h2call` has trouble with."""
    return channel.unary_stream(path, request_serializer=None, response_deserializer=None)(request)
