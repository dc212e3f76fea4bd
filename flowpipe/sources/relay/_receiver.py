"""The receiving process of `collect --workers 2` (`python -m flowpipe.sources.relay._receiver FD SETTINGS`):
reads the GetFlows calls the collector asks for over HTTP/2 (`_h2call`) and hands their responses over in
batches (`_handoff`). What it does and how the collector drives it: `_worker`. It loads neither grpcio nor a
data library: a small process that starts fast.
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
from flowpipe.sources.relay._h2call import FlowsCall
from flowpipe.sources.relay._handoff import (
    CANCEL,
    END,
    START,
    HandoffClosed,
    read_frame,
    send_batch,
    send_json,
)

log = logging.getLogger("flowpipe.sources.relay")

GET_FLOWS = "/observer.Observer/GetFlows"


def _describe(error: BaseException) -> dict[str, Any]:
    return {"code": None, "error": f"{type(error).__name__}: {error}"}


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
        while True:
            cancel, request = self.requests.get()
            try:
                ending = self._call(cancel, request)
            except (OSError, HandoffClosed):
                raise  # the collector is gone
            except Exception as exc:  # noqa: BLE001  (told to the collector, which retries with backoff)
                ending = _describe(exc)
            send_json(self.sock, END, ending)

    def _call(self, cancel: threading.Event, request: bytes) -> dict[str, Any]:
        """Read one call, handing its messages over in batches of `batch_max_flows` (at most
        `max_pending_flows`), or fewer once `batch_max_seconds` passed since a batch's first message."""
        if cancel.is_set():
            return {"code": "CANCELLED", "details": "cancelled before it started"}
        call = FlowsCall(self.settings["address"], self.tls, GET_FLOWS, request)
        count = max(1, min(self.settings["batch_max_flows"], self.settings["max_pending"]))
        seconds = self.settings["batch_max_seconds"]
        batch: list[bytes] = []
        due = 0.0
        while call.status is None:
            if cancel.is_set():
                call.cancel()
                break
            wait = 0.1 if not batch else min(0.1, due - time.monotonic())
            messages = call.read(wait)
            if messages:
                if not batch:
                    due = time.monotonic() + seconds
                batch += messages
            # (a collector that does not read makes `send_batch` wait: the socket is not read meanwhile,
            # and the relay's stream waits for its HTTP/2 window)
            if batch and (len(batch) >= count or time.monotonic() >= due):
                send_batch(self.sock, batch)
                batch = []
        if batch:
            send_batch(self.sock, batch)
        assert call.status is not None
        code, details = call.status
        return {"code": None} if code == "OK" else {"code": code, "details": details}


def main(argv: list[str]) -> None:
    """`python -m flowpipe.sources.relay._receiver FD SETTINGS`: serve the collector on socket FD until it goes."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the collector's to act on: it stops this process itself
        signal.signal(sig, signal.SIG_IGN)
    settings = json.loads(argv[1])
    logging.basicConfig(level=settings.get("log_level", logging.WARNING), format="%(levelname)s %(message)s")
    sock = socket.socket(fileno=int(argv[0]))
    try:
        _Worker(sock, settings).run()
    except (OSError, HandoffClosed):  # the collector is gone
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
