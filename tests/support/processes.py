"""Processes the tests run: `flowpipe simulate-relay` on a free port, and stopping a process by a signal."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path
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


def child_pids(pid: int) -> list[int]:
    """The pids of a running process's children (from /proc)."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in children.read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return found


def process_gone(pid: int) -> bool:
    """Whether a process has ended (a zombie waiting for its parent counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")
