"""The `collect` section of `flowpipe bench`: hubble-relay → dataset over loopback gRPC, against a naive client.

Three child processes, so that each one's CPU and memory are its own:

- the relay: the built-in Observer server with `flows` simulated flows in its buffer (a pool of simulated flows
  repeated with fresh uuids and times), so that serving costs a byte copy per flow, as a real relay's would;
- the collector: `flowpipe.app.collect.collect` following the relay from an empty dataset until every flow is
  written; it samples its resident memory as it goes (peak, and growth over the second half of the stream);
- the naive client: per flow `MessageToDict`, rows gathered into pandas DataFrames and written with `to_parquet`.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from flowpipe.bench.context import BenchContext, Figure, process_cpu_seconds
from flowpipe.errors import FlowpipeError

POOL_FLOWS = 20_000
_PAGE = 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


def _spawn(task: str, *args: str) -> subprocess.Popen[str]:
    code = "import sys; from flowpipe.bench.collect import child_main; child_main(sys.argv[1:])"
    return subprocess.Popen(
        [sys.executable, "-c", code, task, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _report(process: subprocess.Popen[str], task: str, timeout: float = 3600.0) -> dict[str, Any]:
    out, err = process.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    if process.returncode != 0 or not lines:
        raise FlowpipeError(f"bench {task} failed (exit {process.returncode}): {err.strip()[-2000:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def bench_collect(ctx: BenchContext) -> list[Figure]:
    """Throughput and memory of `collect` draining a relay that holds `ctx.flows` flows, and the naive client."""

    dataset = ctx.workdir / "collect-dataset"
    outputs = (dataset, ctx.workdir / "collect-dataset-bare", ctx.workdir / "naive")
    for folder in outputs:  # a kept --workdir holds the last run's checkpoints: start from an empty dataset
        shutil.rmtree(folder, ignore_errors=True)
    relay = _spawn("relay", str(ctx.flows), str(ctx.seed))
    try:
        assert relay.stdout is not None
        ready = relay.stdout.readline().split()
        if len(ready) != 3 or ready[0] != "ready":
            relay.kill()
            raise FlowpipeError(f"bench relay did not start: {relay.communicate()[1][-2000:]}")
        address, fill_seconds = ready[1], float(ready[2])
        ctx.log(
            f"relay on {address} holds {ctx.flows:,} flows (filled in {fill_seconds:.0f}s); collecting them"
        )
        relay_cpu = process_cpu_seconds(relay.pid) or 0.0
        report = _report(_spawn("collector", address, str(dataset), str(ctx.flows), "on"), "collector")
        relay_cpu = (process_cpu_seconds(relay.pid) or 0.0) - relay_cpu
        ctx.log("again with metrics off (no analytics sink, no /metrics)")
        bare = _report(
            _spawn("collector", address, str(ctx.workdir / "collect-dataset-bare"), str(ctx.flows), "off"),
            "collector without metrics",
        )
        if not report["flows"] or not bare["flows"]:
            raise FlowpipeError(f"bench collector received no flows from the relay at {address}")
        limit = min(ctx.flows, ctx.baseline_flows)
        ctx.log(f"naive client on {limit:,} flows")
        naive = _report(_spawn("naive", address, str(ctx.workdir / "naive"), str(limit)), "naive client")
    finally:
        relay.kill()
        relay.wait()
    speed = report["flows"] / report["seconds"]
    naive_speed = naive["flows"] / naive["seconds"]
    samples = report["rss_samples"]
    half = [rss for done, rss in samples if done >= report["flows"] / 2]
    first = [rss for done, rss in samples if done < report["flows"] / 2]
    growth = (max(half) - max(first)) / 1e6 if half and first else None
    return [
        Figure("collect", "flows collected", report["flows"], "flows", target=ctx.flows),
        Figure(
            "collect",
            "relay → dataset throughput",
            speed,
            "flows/s",
            target=50_000,
            note="loopback gRPC, whole flows (no field mask)",
        ),
        Figure("collect", "collector CPU time per flow", report["cpu_seconds"] / report["flows"] * 1e6, "us"),
        Figure(
            "collect",
            "relay CPU time per flow served",
            relay_cpu / report["flows"] * 1e6,
            "us",
            note="the built-in relay shares the 2 cores",
        ),
        Figure("collect", "peak RSS of the collector", report["max_rss_bytes"] / 1e6, "MB", 300, False),
        Figure(
            "collect",
            "RSS growth over the second half",
            growth,
            "MB",
            50,
            False,
            note=f"{len(samples)} samples",
        ),
        Figure(
            "collect", "naive client throughput", naive_speed, "flows/s", note=f"on {naive['flows']:,} flows"
        ),
        Figure("collect", "collect speed / naive client speed", speed / naive_speed, "x", target=3),
        Figure(
            "collect",
            "throughput with metrics on / off",
            speed / (bare["flows"] / bare["seconds"]),
            "x",
            target=0.9,
            note="metrics cost at most 10%",
        ),
    ]


# -- child processes --------------------------------------------------------------------------------------


def _relay_main(count: int, seed: int) -> None:
    from flowpipe._proto.flow import flow_pb2
    from flowpipe.server import ObserverServer
    from flowpipe.sim import Simulator, SimulatorConfig

    started = time.perf_counter()
    pool_size = min(count, POOL_FLOWS)
    simulator = Simulator(
        SimulatorConfig(seed=seed, duration_seconds=600, rate_flows_per_second=pool_size / 600)
    )
    pool = [flow_pb2.Flow.FromString(data) for data in simulator.flow_bytes()][:pool_size]
    span = pool[-1].time.ToNanoseconds() - pool[0].time.ToNanoseconds() + 1_000_000
    server = ObserverServer(port=0, buffer_size=count).start()  # a node's ring never overwrites
    batch: list[flow_pb2.Flow] = []
    for index in range(count):
        base = pool[index % pool_size]
        flow = flow_pb2.Flow()
        flow.CopyFrom(base)
        flow.uuid = str(uuid.UUID(int=index + 1))
        flow.time.FromNanoseconds(base.time.ToNanoseconds() + (index // pool_size) * span)
        batch.append(flow)
        if len(batch) >= 10_000:
            server.publish(batch)
            batch = []
    if batch:
        server.publish(batch)
    print(f"ready {server.address} {time.perf_counter() - started:.1f}", flush=True)
    sys.stdin.close()
    threading.Event().wait()


def _collector_main(address: str, dataset: str, count: int, metrics: bool = True) -> dict[str, Any]:
    from flowpipe.app.collect import COLLECT_MAX_BATCH_BYTES, CollectConfig, collect, use_system_memory_pool
    from flowpipe.config import ParquetSinkConfig, PipelineConfig
    from flowpipe.model import EventBatch
    from flowpipe.sources.relay import RelaySourceConfig

    stop = threading.Event()
    received = 0
    samples: list[tuple[int, int]] = []

    def count_batch(batch: EventBatch) -> None:
        nonlocal received
        received += batch.flows.num_rows
        if received >= count:
            stop.set()

    def sample() -> None:
        last, since = -1, time.monotonic()
        while not stop.wait(0.25):
            samples.append((received, _rss_bytes()))
            if received != last:
                last, since = received, time.monotonic()
            elif time.monotonic() - since > 60:  # the relay has nothing more: stop rather than wait forever
                stop.set()

    use_system_memory_pool()  # as `flowpipe collect` does
    config = CollectConfig(
        source=RelaySourceConfig(address=address, field_mask=False),
        sink=ParquetSinkConfig(path=dataset, writer_id="bench", max_batch_bytes=COLLECT_MAX_BATCH_BYTES),
        pipeline=PipelineConfig(),
        question_interval_seconds=0,  # the periodic question is not part of the stream's path
        metrics_address="127.0.0.1:0" if metrics else None,
    )
    sampler = threading.Thread(target=sample, daemon=True)
    cpu = time.process_time()
    started = time.perf_counter()
    sampler.start()
    result = collect(config, stop=stop, on_batch=count_batch)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    samples.append((received, _rss_bytes()))
    return {"flows": result.pipeline.flows, "seconds": seconds, "cpu_seconds": cpu, "rss_samples": samples}


def _naive_main(address: str, out: str, limit: int) -> dict[str, Any]:
    import grpc
    import pandas as pd
    from google.protobuf.json_format import MessageToDict

    from flowpipe._proto.observer import observer_pb2

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    channel = grpc.insecure_channel(address)
    call = channel.unary_stream(
        "/observer.Observer/GetFlows",
        request_serializer=observer_pb2.GetFlowsRequest.SerializeToString,
        response_deserializer=observer_pb2.GetFlowsResponse.FromString,
    )
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    flows = part = 0

    def write() -> None:
        nonlocal rows, part
        frame = pd.json_normalize(rows)
        try:
            frame.to_parquet(folder / f"part-{part}.parquet")
        except (ValueError, TypeError, ImportError):  # mixed-type columns: the frame was still built
            pass
        rows, part = [], part + 1

    stream = call(observer_pb2.GetFlowsRequest(number=2**64 - 1))
    for response in stream:
        if response.WhichOneof("response_types") != "flow":
            continue
        rows.append(MessageToDict(response.flow, preserving_proto_field_name=True))
        flows += 1
        if len(rows) >= 20_000:
            write()
        if flows >= limit:
            stream.cancel()
            break
    if rows:
        write()
    channel.close()
    return {"flows": flows, "seconds": time.perf_counter() - started}


def child_main(argv: list[str]) -> None:
    """Entry point of the bench children: `relay COUNT SEED`, `collector ADDRESS DATASET COUNT`,
    `naive ADDRESS OUT LIMIT`; each prints one JSON report (the relay: `ready ADDRESS SECONDS`)."""
    task, *args = argv
    if task == "relay":
        _relay_main(int(args[0]), int(args[1]))
        return
    if task == "collector":
        report = _collector_main(args[0], args[1], int(args[2]), metrics=args[3:4] != ["off"])
    elif task == "naive":
        report = _naive_main(args[0], args[1], int(args[2]))
    else:
        raise SystemExit(f"unknown bench task {task}")
    report["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(report))
