"""The receiving process: reads and decodes GetFlows streams for the collector, so that collecting uses two cores.

```
collector process (RelaySource: connect, resume, dedupe; sinks; checkpoint; /metrics)
   │ ▲   S: a serialised GetFlowsRequest      C: cancel the call      (end of connection: exit)
   ▼ │   D: batches of flow-table rows (Arrow IPC)      B: batches of raw GetFlowsResponse bytes
   │ │   E: the call ended (status code and details, the CPU time spent decoding)
receiving process (`_receiver`): one GetFlows call at a time over HTTP/2 (`_h2call`) ─▶ decode ─▶ batches
```

The receiving process does not load grpcio (which costs several microseconds a streamed message): it reads the
call's HTTP/2 frames itself and finds the responses in them, where they stay: a batch of them (`batch_max_flows`,
or `batch_max_seconds` after its first flow) is taken as one run over the buffer it arrived in (`_h2call.MessageRun`,
an Arrow binary array over that buffer, no copy of a message) and decoded there into flow-table rows (ptars and the flow table, the
same code as in one process: `from_proto.decode_flow_rows`), which cross as one Arrow IPC frame (`_handoff`);
the collector takes them as they are, with no decoding of its own. Responses that are not flows (lost events,
node status: rare) and a batch that does not decode cross as raw bytes, and the collector decodes them as one
process does (a bad message is reported there). The receiving process holds nothing durable and decides
nothing: the collector says which stream to open (from its own resume point) and when to end it, skips repeats,
moves the resume point, and moves its checkpoint only for what its sinks made durable, as with one process.

- **Backpressure**: a collector that falls behind stops reading the socket; once its buffer (a few MiB) is
  full, the receiving process waits in `sendall` and stops reading its connection (it holds at most a batch
  of `max_pending_flows`, and the rows of the batch being handed over), and the relay's stream waits (HTTP/2
  flow control).
- **Either process killed**: the collector killed, its end of the socket closes and the receiving process exits
  (it ignores SIGINT and SIGTERM, which are the collector's to act on). The receiving process killed (reading,
  decoding or in the middle of a frame), the collector sees the socket close, drops the partial frame, counts it
  as a lost stream, and starts a new receiving process with the reconnect backoff; the new stream resumes from
  the collector's resume point and repeats are skipped.
- **Stop**: the collector cancels the call, reads what the receiving process still sends until the end of the
  call, and then closes the socket (the receiving process exits).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pyarrow as pa

import flowpipe
from flowpipe.sources.relay._connect import CallError
from flowpipe.sources.relay._handoff import (
    BATCH,
    CANCEL,
    DECODED,
    END,
    START,
    HandoffClosed,
    batch_messages,
    decoded_rows,
    json_payload,
    read_frame,
    send_frame,
    socket_pair,
    wait_readable,
)

if TYPE_CHECKING:
    from flowpipe.sources.relay._config import RelaySourceConfig

log = logging.getLogger("flowpipe.sources.relay")

RECEIVER_MODULE = "flowpipe.sources.relay._receiver"
"""What the receiving process runs (`python -m`): it loads no grpcio and no data library."""
JOIN_SECONDS = 5.0
"""How long the collector waits for the receiving process to end a call before it kills the process."""


class ReceiverGone(Exception):
    """The receiving process ended (killed, or failed) while the collector was using it."""


# -- the collector's side ---------------------------------------------------------------------------------


def _settings(config: RelaySourceConfig, decode: bool) -> dict[str, Any]:
    tls = config.tls
    return {
        "address": config.address,
        "tls": None
        if tls is None
        else {"ca": tls.ca_path, "cert": tls.cert_path, "key": tls.key_path, "name": tls.server_name},
        "max_pending": config.max_pending_flows,
        "batch_max_flows": config.batch_max_flows,
        "batch_max_seconds": config.batch_max_seconds,
        "log_level": logging.getLogger("flowpipe").getEffectiveLevel(),
        "decode": decode,
        "cluster_name": config.cluster_name,
    }


class ReceivingProcess:
    """The collector's handle on its receiving process (started at once; `close()` ends it). With `decode`, it
    hands flows over as flow-table rows; without, every response as bytes."""

    def __init__(self, config: RelaySourceConfig, *, decode: bool = True) -> None:
        ours, theirs = socket_pair()
        environment = dict(os.environ)
        # the package as this process imported it, whatever the working directory and path of the child
        root = str(Path(flowpipe.__file__).resolve().parent.parent)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [root, environment.get("PYTHONPATH")]))
        command = [
            sys.executable,
            "-m",
            RECEIVER_MODULE,
            str(theirs.fileno()),
            json.dumps(_settings(config, decode)),
        ]
        try:
            self.process = subprocess.Popen(
                command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=environment
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.pid = self.process.pid

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None

    def follow(self, request: bytes, on_first: Callable[[], None]) -> RemoteStream:
        """Ask for one GetFlows call with a serialised request; its batches come through the stream returned."""
        stream = RemoteStream(self, on_first)
        try:
            send_frame(self.sock, START, request)
        except OSError:
            stream.gone()
        return stream

    def ended(self) -> str:
        """How the process ended, in words (waits a little for it)."""
        try:
            code = self.process.wait(1.0)
        except subprocess.TimeoutExpired:
            return "closed its socket"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def kill(self) -> None:
        """End the process at once."""
        if self.alive:
            self.process.kill()
        self.process.wait()

    def close(self) -> None:
        """End the process: its socket closes, so it exits; killed if it does not within a few seconds."""
        self.sock.close()
        try:
            self.process.wait(JOIN_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()


class RemoteStream:
    """One GetFlows call read by the receiving process; `take`, `stop`, `join` and `error` as StreamReceiver's."""

    def __init__(self, process: ReceivingProcess, on_first: Callable[[], None]) -> None:
        self.process = process
        self.on_first = on_first
        self.first = True
        self.done = False
        self.stopping = False
        self.error: BaseException | None = None
        self.receive_seconds = 0.0
        """Thread CPU time spent reading batches from the socket (the collector's share of receiving)."""
        self.decode_seconds = 0.0
        """CPU time the receiving process spent decoding this call's batches (told at the end of the call)."""
        self._held: pa.BinaryArray | pa.Table | None = None

    def gone(self) -> None:
        """The receiving process is gone: the call is over."""
        if not self.done:
            self.done = True
            # (no pid in the text: the connection log says each reason once, however many processes end alike)
            self.error = ReceiverGone(f"the receiving process {self.process.ended()}")

    def _read(self) -> pa.BinaryArray | pa.Table | None:
        """Read one frame: a batch's messages or decoded rows, or None (the call ended, `done` is set)."""
        started = time.thread_time()
        try:
            kind, count, payload = read_frame(self.process.sock)
        except (HandoffClosed, OSError):
            self.gone()
            return None
        if kind in (BATCH, DECODED):
            batch = batch_messages(count, payload) if kind == BATCH else decoded_rows(payload)
            self.receive_seconds += time.thread_time() - started
            return batch
        if kind == END:
            self.done = True
            ending = json_payload(payload)
            self.decode_seconds += ending.get("decode_seconds") or 0.0
            if ending.get("code"):
                self.error = CallError(grpc.StatusCode[ending["code"]], ending.get("details") or "")
            elif ending.get("error"):
                self.error = ReceiverGone(f"the receiving process failed: {ending['error']}")
            return None
        self.process.kill()  # out of step: start again with a new process
        self.gone()
        return None

    def take(self, count: int, wait_seconds: float, stop: threading.Event) -> tuple[Any, bool]:
        """The next batch (waiting up to `wait_seconds` for it) and whether the call is over: messages (an Arrow
        binary array) or decoded rows (a table of the flow table's columns).

        The receiving process batches by time and count; frames of messages already waiting are taken together
        up to `count` messages (fewer, larger batches cost less to decode and write)."""
        deadline = time.monotonic() + wait_seconds
        while not self.done or self._held is not None:
            if self._held is not None:
                messages, self._held = self._held, None
                return self._more(messages, count), False
            left = deadline - time.monotonic()
            if wait_readable(self.process.sock, min(max(left, 0.0), 0.1)):
                messages = self._read()
                if messages is None:
                    continue
                if self.first:
                    self.first = False
                    self.on_first()
                return self._more(messages, count), False
            if stop.is_set() or left <= 0:
                return [], False
        return [], True

    def _more(self, messages: pa.BinaryArray | pa.Table, count: int) -> pa.BinaryArray | pa.Table:
        """`messages` and the batch frames that already wait after them, up to `count` messages in all (decoded
        rows come a whole batch to a frame, and are taken alone)."""
        if not isinstance(messages, pa.BinaryArray):
            return messages
        frames, total = [messages], len(messages)
        while total < count and not self.done and wait_readable(self.process.sock, 0.0):
            more = self._read()
            if more is None:
                break  # the call ended: that is seen at the next take, after these messages
            if not isinstance(more, pa.BinaryArray):
                self._held = more  # rows: the next take's
                break
            frames.append(more)
            total += len(more)
        if len(frames) == 1:
            return messages
        joined: pa.BinaryArray = pa.concat_arrays(frames)
        return joined

    def stop(self) -> None:
        """Ask the receiving process to end the call (the batches it still sends are read by `join`)."""
        if self.stopping or self.done:
            return
        self.stopping = True
        try:
            send_frame(self.process.sock, CANCEL)
        except OSError:
            self.gone()

    def join(self, timeout: float) -> None:
        """Read (and drop) what the call still sends until its end; kill the process after `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.done:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("the receiving process did not end its call within %.0fs: killing it", timeout)
                self.process.kill()
                self.gone()
                return
            if wait_readable(self.process.sock, min(left, 0.1)):
                self._read()

    def is_alive(self) -> bool:
        """Whether the call is still going (as a thread's)."""
        return not self.done
