"""The `serve-hubble` section of `flowpipe bench`: the Hubble API over 10x `--flows` stored flows.

The dataset is the simulated base hour written again and again an hour later (as in the `scale` section), up to
ten times `--flows` (10 million by default). `flowpipe serve-hubble` runs in a child process (so that its peak RSS
is its own, read from /proc at the end); a grpcio client over loopback measures the latencies, and collect's
own stream reader (HTTP/2) the streaming rate:

- the first flow of `GetFlows(since=24h, namespace=X)` (`hubble observe --since 24h --namespace X`), X the
  busiest namespace: under 0.5 s;
- `GetFlows(number=20)` (what `hubble observe` asks by default), whole answer: under 0.3 s;
- every flow of a window of about a million flows (or all, when fewer) to a client that keeps up: at least
  100,000 flows/s; the server's peak RSS under 300 MB.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pyarrow.compute as pc

from flowpipe.bench.context import BenchContext, Figure, peak_rss_mb, process_cpu_seconds
from flowpipe.errors import FlowpipeError

SERVE_FACTOR = 10
FIRST_FLOW_TARGET_SECONDS = 0.5
LAST_20_TARGET_SECONDS = 0.3
STREAM_TARGET_FLOWS_PER_SECOND = 100_000
PEAK_RSS_TARGET_MB = 300.0
STREAM_WINDOW_FLOWS = 1_000_000


def _start_server(root: Path) -> tuple[subprocess.Popen[str], str]:
    from flowpipe.errors import FlowpipeError

    process = subprocess.Popen(
        [sys.executable, "-m", "flowpipe", "serve-hubble", "--dataset", str(root), "--listen", "127.0.0.1:0",
         "--metrics-address", "off"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"on (127\.0\.0\.1:\d+)", line)
    if match is None:
        process.kill()
        raise FlowpipeError(f"serve-hubble did not start: {line!r}")
    return process, match.group(1)


def bench_serve_hubble(ctx: BenchContext) -> list[Figure]:
    """First-flow latency, last-20 latency, streaming throughput and peak RSS of serve-hubble."""
    import grpc

    from flowpipe._proto.flow import flow_pb2
    from flowpipe._proto.observer import observer_pb2, observer_pb2_grpc
    from flowpipe.bench.scale import _base, _Grower, _label
    from flowpipe.sources.relay._h2call import FlowsCall

    base, start = _base(ctx)
    total = SERVE_FACTOR * ctx.flows
    grower = _Grower(ctx.workdir / "serve-hubble", base)
    started = time.perf_counter()
    grower.grow(total)
    ctx.log(f"serve-hubble: {grower.written:,} flows written ({time.perf_counter() - started:.0f} s)")
    end = start + timedelta(hours=grower.copies)
    counts = pc.value_counts(base.column("source_namespace").drop_null())
    busiest = max(counts.to_pylist(), key=lambda item: item["counts"])["values"]
    label = _label(grower.written)
    process, address = _start_server(grower.root)
    figures: list[Figure] = []
    try:
        with grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 << 20)]
        ) as channel:
            stub = observer_pb2_grpc.ObserverStub(channel)
            grpc.channel_ready_future(channel).result(timeout=30)
            # A running server: its dataset figures (node names for node_status) are computed at start.
            stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=600)

            def since(delta: timedelta) -> observer_pb2.GetFlowsRequest:
                request = observer_pb2.GetFlowsRequest()
                request.since.FromDatetime(end - delta)
                return request

            # hubble observe --since 24h --namespace X: two whitelist filters, first flow.
            request = since(timedelta(hours=24))
            request.follow = False
            request.whitelist.extend(
                [
                    flow_pb2.FlowFilter(source_pod=[f"{busiest}/"]),
                    flow_pb2.FlowFilter(destination_pod=[f"{busiest}/"]),
                ]
            )
            began = time.perf_counter()
            first = None
            responses = stub.GetFlows(request, timeout=600)
            for response in responses:
                if response.HasField("flow"):
                    first = time.perf_counter() - began
                    break
            responses.cancel()
            figures.append(
                Figure("serve-hubble", f"first flow of since=24h namespace={busiest} over {label} flows", first,
                       "s", FIRST_FLOW_TARGET_SECONDS, False)
            )  # fmt: skip

            began = time.perf_counter()
            got = sum(
                1
                for r in stub.GetFlows(observer_pb2.GetFlowsRequest(number=20), timeout=600)
                if r.HasField("flow")
            )
            seconds = time.perf_counter() - began
            figures.append(
                Figure("serve-hubble", f"number=20 over {label} flows", seconds, "s", LAST_20_TARGET_SECONDS, False,
                       f"{got} flows")
            )  # fmt: skip

            hours = max(1, min(grower.copies - 1, round(STREAM_WINDOW_FLOWS / max(base.num_rows, 1))))
            # A client that keeps up: collect's own stream reader (HTTP/2, each response's bytes as they come,
            # no decoding in Python), as `flowpipe collect --server` would read serve-hubble.
            cpu_before = process_cpu_seconds(process.pid)
            # Whole hours before the last one (the last copy may be partial): about STREAM_WINDOW_FLOWS flows.
            window = observer_pb2.GetFlowsRequest()
            window.since.FromDatetime(end - timedelta(hours=hours + 1))
            window.until.FromDatetime(end - timedelta(hours=1))
            began = time.perf_counter()
            call = FlowsCall(address, None, "/observer.Observer/GetFlows", window.SerializeToString())
            streamed = -1  # node_status
            while call.status is None:
                streamed += len(call.read(1.0))
            if call.status[0] != "OK":
                raise FlowpipeError(f"serve-hubble ended the stream with {call.status[0]}: {call.status[1]}")
            seconds = time.perf_counter() - began
            cpu_after = process_cpu_seconds(process.pid)
            cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
            load = os.getloadavg()[0]
            figures.append(
                Figure("serve-hubble", f"streaming a {hours} h window", streamed / seconds if seconds else None,
                       "flows/s", STREAM_TARGET_FLOWS_PER_SECOND, True, f"{streamed:,} flows in {seconds:.1f} s; server {cpu or 0:.1f} CPU-s "
                       f"({streamed / cpu if cpu else 0:,.0f} flows per CPU-s); load average {load:.1f}")
            )  # fmt: skip
    finally:
        rss = peak_rss_mb(process.pid)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    figures.append(Figure("serve-hubble", "server peak RSS", rss, "MB", PEAK_RSS_TARGET_MB, False))
    return figures
