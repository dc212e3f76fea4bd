"""What the relay source logs about the relay: connection failures and recoveries, node status, lost events.

A relay that stays down would otherwise fill the log with one line per reconnect attempt. `ConnectionLog` logs
each failure once per distinct reason (later attempts with the same reason at debug level, and a reminder with
the count and duration every few minutes), and the recovery once. A node status line repeated by the relay is
logged at most once a minute; every lost-events record is a warning.
"""

from __future__ import annotations

import logging
import time

from flowpipe.model import LostEvent

# The relay source's logger: these lines are the source's own, and read (and filtered) under its name.
log = logging.getLogger("flowpipe.sources.relay")

REMINDER_SECONDS = 300.0
"""How often a failure that goes on with the same reason is logged again."""

NODE_STATUS_REPEAT_SECONDS = 60.0
"""How long the same node status line is not logged again."""


class ConnectionLog:
    """Logs the connection state of one relay address: failures once per reason, the recovery once."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._failure_reason: str | None = None
        self._failure_since: float | None = None
        self._failures = 0
        self._last_reminder = 0.0
        self._status_logged: dict[str, float] = {}

    def failed(self, reason: str, attempt: int) -> None:
        """An attempt failed (or the stream ended) with `reason`; `attempt` counts since the last success."""
        now = time.monotonic()
        if self._failure_since is None:
            self._failure_since = now
        self._failures += 1
        if reason != self._failure_reason:
            self._failure_reason = reason
            self._last_reminder = now
            log.warning("%s; retrying with backoff (attempt %d)", reason, attempt)
        elif now - self._last_reminder >= REMINDER_SECONDS:
            self._last_reminder = now
            log.warning(
                "still failing after %d attempts over %.0fs: %s",
                self._failures,
                now - self._failure_since,
                reason,
            )
        else:
            log.debug("attempt %d failed: %s", attempt, reason)

    def connected(self) -> None:
        """A connection succeeded: says so once after failures, and forgets them."""
        if self._failure_since is not None:
            log.warning(
                "connected to hubble-relay %s again after %d failed attempt(s) over %.1fs",
                self.address, self._failures, time.monotonic() - self._failure_since,
            )  # fmt: skip
        self._failure_reason = None
        self._failure_since = None
        self._failures = 0

    def node_status(self, state: str, names: list[str], message: str) -> None:
        """A node_status event of the relay (NODE_CONNECTED at info level, any other state as a warning)."""
        text = f"{state}: {', '.join(names) or '-'}{': ' + message if message else ''}"
        now = time.monotonic()
        if now - self._status_logged.get(text, -1e9) < NODE_STATUS_REPEAT_SECONDS:
            return
        self._status_logged[text] = now
        level = logging.INFO if state == "NODE_CONNECTED" else logging.WARNING
        log.log(level, "hubble-relay %s node status %s", self.address, text)

    def lost_events(self, event: LostEvent) -> None:
        """A lost-events record kept for the dataset (this shard's, first time seen)."""
        log.warning(
            "Hubble lost %d event(s) on %s (%s)",
            event.num_events_lost,
            event.node_name or "the relay",
            event.source,
        )
