"""The receiving process of `collect --workers 2` (`python -m flowpipe.sources.relay._receiver FD SETTINGS`):
reads the GetFlows calls the collector asks for over HTTP/2 (`_h2call`), decodes their flows into flow-table
rows (`from_proto.decode_flow_rows`, on this process's CPU and interpreter lock) and hands them over in
batches (`_handoff`). What it does and how the collector drives it: `_worker`. Its module loads neither grpcio
nor a data library; the decoder (Arrow, ptars) is loaded when the collector asks for decoded batches, and
pandas never is (nothing here turns rows into Python objects).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Any

from flowpipe.sources.relay._address import RelayTLS
from flowpipe.sources.relay._h2call import PREFIX_BYTES, FlowsCall, MessageRun
from flowpipe.sources.relay._handoff import (
    CANCEL,
    END,
    START,
    HandoffClosed,
    read_frame,
    send_batch,
    send_json,
    send_table,
)

log = logging.getLogger("flowpipe.sources.relay")

GET_FLOWS = "/observer.Observer/GetFlows"
RUN_MAX_BYTES = 64 * 1024 * 1024
"""Most message bytes of one batch (a batch of `batch_max_flows` large responses is handed over sooner)."""


def _describe(error: BaseException) -> dict[str, Any]:
    return {"code": None, "error": f"{type(error).__name__}: {error}"}


class _NoPandas:
    """An import hook that makes pandas unavailable to this process: Arrow looks for it when it builds an array,
    and loading it would cost tens of MB here for nothing."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError("the receiving process does not load pandas", name=name)


class _Decoder:
    """Decodes a batch of responses into flow-table rows and hands them over (`D` frames); the responses that
    are not flows, and a batch that cannot be decoded, are handed over as they came (`B` frames)."""

    def __init__(self, cluster_name: str | None) -> None:
        import pyarrow as pa

        from flowpipe.transforms.from_proto import decode_flow_rows

        # freed batches go back to the system sooner (as in the collector)
        pa.set_memory_pool(pa.system_memory_pool())
        self.cluster_name = cluster_name
        self.decode = decode_flow_rows
        self.seconds = 0.0
        """Thread CPU time spent decoding (this process's share of the decode stage)."""

    def send(self, sock: socket.socket, run: MessageRun) -> None:
        started = time.thread_time()
        try:
            flows, others = self.decode(run.array(), cluster_name=self.cluster_name)
        except Exception:  # noqa: BLE001  (not valid protobuf: the collector finds and reports the bad messages)
            self.seconds += time.thread_time() - started
            send_batch(sock, run.messages())
            return
        self.seconds += time.thread_time() - started
        if flows.num_rows:
            send_table(sock, flows)
        if others is not None:  # (as the array holds them: each behind its rewritten prefix)
            send_batch(sock, [message[PREFIX_BYTES:] for message in others])


class _Worker:
    """The receiving process: a control thread reads the collector's requests, the main thread reads the call
    (`_h2call.FlowsCall`) and sends its batches."""

    def __init__(self, sock: socket.socket, settings: dict[str, Any]) -> None:
        self.sock = sock
        self.settings = settings
        tls = settings["tls"]
        self.tls = None if tls is None else RelayTLS(tls["ca"], tls["cert"], tls["key"], tls["name"])
        self.requests: queue.Queue[tuple[threading.Event, bytes]] = queue.Queue()
        self.lock = threading.Lock()
        self.cancel: threading.Event | None = None
        self.decoder: _Decoder | None = None

    def control(self) -> None:
        """Read the collector's frames; the end of the connection (the collector is gone) ends the process."""
        try:
            while True:
                kind, _, payload = read_frame(self.sock)
                with self.lock:
                    if kind == START:
                        self.cancel = threading.Event()
                        self.requests.put((self.cancel, bytes(payload)))
                    elif kind == CANCEL and self.cancel is not None:
                        self.cancel.set()  # the call's loop looks at it between reads (every 0.1 s at most)
        except (HandoffClosed, OSError):
            code = 0
        except BaseException:  # a bug here must not leave a process that nobody controls
            log.exception("the receiving process stops")
            code = 1
        os._exit(code)  # nothing here is durable: nothing to flush

    def run(self) -> None:
        threading.Thread(target=self.control, name="flowpipe-receiver-control", daemon=True).start()
        if self.settings.get("decode"):
            self.decoder = _Decoder(self.settings.get("cluster_name"))
        while True:
            cancel, request = self.requests.get()
            decoded_before = self.decoder.seconds if self.decoder is not None else 0.0
            try:
                ending = self._call(cancel, request)
            except (OSError, HandoffClosed):
                raise  # the collector is gone
            except Exception as exc:  # noqa: BLE001  (told to the collector, which retries with backoff)
                ending = _describe(exc)
            if self.decoder is not None:
                ending["decode_seconds"] = self.decoder.seconds - decoded_before
            send_json(self.sock, END, ending)

    def _send(self, run: MessageRun) -> None:
        if self.decoder is not None:
            self.decoder.send(self.sock, run)
        else:
            send_batch(self.sock, run.messages())

    def _call(self, cancel: threading.Event, request: bytes) -> dict[str, Any]:
        """Read one call, handing its messages over (decoded, with a decoder) in batches of `batch_max_flows`
        (at most `max_pending_flows`, and `RUN_MAX_BYTES`), or fewer once `batch_max_seconds` passed since a
        batch's first message. The call holds a batch's messages in the buffer they arrived in until the batch is
        taken (`FlowsCall.take`)."""
        if cancel.is_set():
            return {"code": "CANCELLED", "details": "cancelled before it started"}
        call = FlowsCall(self.settings["address"], self.tls, GET_FLOWS, request)
        count = max(1, min(self.settings["batch_max_flows"], self.settings["max_pending"]))
        seconds = self.settings["batch_max_seconds"]
        due = 0.0
        while call.status is None:
            if cancel.is_set():
                call.cancel()
                break
            held = call.held
            wait = 0.1 if not held else min(0.1, due - time.monotonic())
            call.receive(wait)
            if not held and call.held:
                due = time.monotonic() + seconds
            # (a collector that does not read makes the hand-over wait: the socket is not read meanwhile,
            # and the relay's stream waits for its HTTP/2 window)
            if (
                call.held >= count
                or call.held_bytes >= RUN_MAX_BYTES
                or (call.held and time.monotonic() >= due)
            ):
                self._send(call.take())  # type: ignore[arg-type]  (held: a run)
        run = call.take()
        if run is not None:
            self._send(run)
        assert call.status is not None
        code, details = call.status
        return {"code": None} if code == "OK" else {"code": code, "details": details}


def main(argv: list[str]) -> None:
    """`python -m flowpipe.sources.relay._receiver FD SETTINGS`: serve the collector on socket FD until it goes."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the collector's to act on: it stops this process itself
        signal.signal(sig, signal.SIG_IGN)
    settings = json.loads(argv[1])
    if settings.get("decode"):
        sys.meta_path.insert(0, _NoPandas)  # type: ignore[arg-type]
    logging.basicConfig(level=settings.get("log_level", logging.WARNING), format="%(levelname)s %(message)s")
    sock = socket.socket(fileno=int(argv[0]))
    try:
        _Worker(sock, settings).run()
    except (OSError, HandoffClosed):  # the collector is gone
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
