"""Processes the tests run: `flowpipe simulate-relay` on a free port, and stopping a process by a signal."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from typing import Any

import pytest


def start_simulate_relay(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Run `flowpipe simulate-relay` on a free loopback port; returns the process and its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "flowpipe", "simulate-relay", "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    first_line = process.stdout.readline()
    match = re.search(r"listening on (127\.0\.0\.1:\d+)", first_line)
    if match is None:
        process.kill()
        pytest.fail(
            f"simulate-relay did not start: {first_line!r} {process.stderr.read() if process.stderr else ''}"
        )
    return process, match.group(1)


def stop_process(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Send `sig` and return the exit code (the process is killed if it has not exited within `timeout`)."""
    try:
        if process.poll() is None:
            process.send_signal(sig)
        return process.wait(timeout)
    finally:
        if process.poll() is None:
            process.kill()
