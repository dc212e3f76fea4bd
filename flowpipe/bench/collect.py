"""The `collect` section of `flowpipe bench`: hubble-relay → dataset over loopback gRPC, against a naive client.

Three child processes, so that each one's CPU and memory are its own:

- the relay: the built-in Observer server's transport serving 3M simulated flows (a pool of simulated flows
  repeated with fresh random uuids and times, written into the pool's encoded responses as they are sent:
  `bench.collect_relay`), so that serving costs about a byte copy per flow, as a real relay's would, and 3M
  flows take no memory of their own;
- the collector: `flowpipe.app.collect.collect` following the relay from an empty dataset until the first 1M
  flows are written, with two workers (the stream read and decoded by a receiving process of its own), with one, and with
  one reading through grpcio (`--receiver grpcio`: the single grpcio process `collect` was before it read the
  stream itself, the baseline of the 2-worker speedup), then 3M with two (a `--flows` below 1M: that many,
  with all three); it samples the resident memory of its processes together as it goes (peak, and growth over
  the second half of the stream), times the stream from its first batch through to the last flow written (the
  start-up before it, processes and imports and the call, is printed apart) and splits its CPU time by stage: decode (the decoding thread's time, and with
  two workers what the receiving process reports of its own decoding), write (the sinks' thread) and receive
  (the rest: gRPC or HTTP/2 reading, the hand-over), and with two workers by process (each under an interpreter
  lock of its own: the larger share bounds the throughput);
- the naive client: per flow `MessageToDict`, rows gathered into pandas DataFrames and written with `to_parquet`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
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


COLLECT_SIZES = (1_000_000, 3_000_000)
"""Stream lengths measured: 1M with two workers, with one and with one grpcio process, 3M with two (a smaller
`--flows`: that many, with all three; a larger one: that many as well, with two)."""

MODES = {"2 workers": ("2", "http2"), "1 worker": ("1", "http2"), "grpcio": ("1", "grpcio")}
"""The ways of collecting measured: (workers, receiver)."""


def _sizes(flows: int) -> list[int]:
    if flows < COLLECT_SIZES[0]:
        return [flows]
    return sorted({*COLLECT_SIZES, flows})


def _modes(size: int, sizes: list[int]) -> tuple[str, ...]:
    """The modes (`MODES`) measured at `size`: all at the first size, 2 workers beyond (the comparisons once)."""
    return tuple(MODES) if size == sizes[0] else ("2 workers",)


def _mb(value: float | None) -> float | None:
    return None if value is None else value / 1e6


def _growth(report: dict[str, Any]) -> float | None:
    """How much higher the resident memory peaked in the second half of the stream than in the first (bytes)."""
    samples = report["rss_samples"]
    half = [rss for done, rss in samples if done >= report["flows"] / 2]
    first = [rss for done, rss in samples if done < report["flows"] / 2]
    return float(max(half) - max(first)) if half and first else None


def _stage_figures(report: dict[str, Any], label: str) -> list[Figure]:
    """CPU-µs per flow of each stage: receive (the stream and its hand-over), decode (the flow table, the repeat
    check and resume tracking), write (the sinks and metrics); with two workers, each process's whole share too
    (each runs under an interpreter lock of its own: the larger share bounds the throughput)."""

    flows = max(report["flows"], 1)
    stages = report["stages"]
    two = bool(stages["receiving process"])
    notes = {
        "receive": "HTTP/2 reading (the receiving process), the hand-over (both); the rest of the CPU"
        if two
        else "gRPC, the stream's thread; the rest of the collector's CPU",
        "decode": "ptars and the flow table (the receiving process), the repeat check, resume tracking (the "
        "collector)"
        if two
        else "ptars, the flow table, the repeat check, resume tracking",
        "write": "Parquet, the analytics sink, flush bookkeeping (the collector)",
        "receiving process": "HTTP/2 reading, decoding and handing over: one interpreter lock",
        "decode in the receiving process": "of the decode stage: ptars and the flow table",
        "collector process": "taking batches, the repeat check, resume tracking, write: the other lock",
    }
    shown = ["receive", "decode", "write"]
    if two:
        shown += ["receiving process", "decode in the receiving process", "collector process"]
    return [
        Figure(
            "collect", f"CPU per flow: {stage}, {label}", stages[stage] / flows * 1e6, "us", note=notes[stage]
        )
        for stage in shown
    ]


def bench_collect(ctx: BenchContext) -> list[Figure]:
    """Throughput, CPU by stage and memory of `collect` with two workers over 1M and 3M flows (and one worker over
    1M), draining the bench's relay, and the naive client."""

    root = ctx.workdir / "collect"
    shutil.rmtree(root, ignore_errors=True)  # a kept --workdir holds the last run's checkpoints
    shutil.rmtree(ctx.workdir / "collect-dataset", ignore_errors=True)  # (older bench runs)
    root.mkdir(parents=True)
    sizes = _sizes(ctx.flows)
    relay = _spawn("relay", str(max(sizes)), str(ctx.seed))
    runs: dict[tuple[int, str], dict[str, Any]] = {}
    try:
        assert relay.stdout is not None
        ready = relay.stdout.readline().split()
        if len(ready) != 3 or ready[0] != "ready":
            relay.kill()
            raise FlowpipeError(f"bench relay did not start: {relay.communicate()[1][-2000:]}")
        address, fill_seconds = ready[1], float(ready[2])
        ctx.log(f"relay on {address} serves {max(sizes):,} flows (ready in {fill_seconds:.0f}s)")
        relay_cpu = served = 0.0
        for size in sizes:
            for mode in _modes(size, sizes):
                ctx.log(f"collecting {size:,} flows, {mode}")
                before = process_cpu_seconds(relay.pid) or 0.0
                workers, receiver = MODES[mode]
                folder = str(root / f"{size}-{workers}-{receiver}")
                report = _report(
                    _spawn("collector", address, folder, str(size), "on", workers, receiver),
                    f"collector ({mode})",
                )
                relay_cpu += (process_cpu_seconds(relay.pid) or 0.0) - before
                served += report["flows"]
                if not report["flows"]:
                    raise FlowpipeError(f"bench collector received no flows from the relay at {address}")
                runs[size, mode] = report
        size = sizes[0]
        ctx.log(f"again with metrics off (no analytics sink, no /metrics), {size:,} flows, 2 workers")
        bare = _report(
            _spawn("collector", address, str(root / "bare"), str(size), "off", "2"),
            "collector without metrics",
        )
        ctx.log(f"again with edge rollups on, {size:,} flows, 2 workers")
        rolled = _report(
            _spawn("collector", address, str(root / "rollups"), str(size), "on", "2", "http2", "rollups"),
            "collector with edge rollups",
        )
        limit = min(ctx.flows, ctx.baseline_flows)
        ctx.log(f"naive client on {limit:,} flows")
        naive = _report(_spawn("naive", address, str(root / "naive"), str(limit)), "naive client")
    finally:
        relay.kill()
        relay.wait()
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    figures: list[Figure] = []
    for size in sizes:
        two, one, grpcio = runs[size, "2 workers"], runs.get((size, "1 worker")), runs.get((size, "grpcio"))
        label = f"{size / 1e6:g}M flows"
        speed2 = _rate(two)
        figures += [
            Figure("collect", f"flows collected, {label}", two["flows"], "flows", target=size),
            Figure(
                "collect",
                f"relay → dataset throughput, {label}, 2 workers",
                speed2,
                "flows/s",
                target=90_000,
                note=f"loopback gRPC, whole flows, the relay on the same cores; {load}; from the first batch "
                "through to the last flow written",
            ),
            Figure(
                "collect",
                f"start-up: the first batch through after, {label}, 2 workers",
                two["startup_seconds"],
                "s",
                note=f"the processes started, the call made, the first batch written; with it the whole run "
                f"made {two['flows'] / two['seconds']:,.0f} flows/s",
            ),
            Figure(
                "collect",
                f"collector CPU time per flow, {label}, 2 workers",
                two["cpu_seconds"] / two["flows"] * 1e6,
                "us",
                note="both processes",
            ),
            *_stage_figures(two, f"{label}, 2 workers"),
            Figure(
                "collect",
                f"peak RSS of the collector's processes, {label}, 2 workers",
                _mb(two["max_rss_bytes"]),
                "MB",
                400,
                False,
                note="both processes together",
            ),
            Figure(
                "collect",
                f"RSS growth over the second half, {label}, 2 workers",
                _mb(_growth(two)),
                "MB",
                50,
                False,
                note=f"{len(two['rss_samples'])} samples",
            ),
        ]
        if one is None or grpcio is None:
            continue
        speed1, speed_grpcio = _rate(one), _rate(grpcio)
        figures += [
            Figure(
                "collect",
                f"relay → dataset throughput, {label}, 1 grpcio process",
                speed_grpcio,
                "flows/s",
                note="--workers 1 --receiver grpcio: the single grpcio process collect started from",
            ),
            Figure(
                "collect",
                f"2 workers / 1 grpcio process, {label}",
                speed2 / speed_grpcio,
                "x",
                target=1.6,
                note="the same run, the same relay",
            ),
            Figure(
                "collect",
                f"collector CPU time per flow, {label}, 1 grpcio process",
                grpcio["cpu_seconds"] / grpcio["flows"] * 1e6,
                "us",
            ),
            Figure(
                "collect", f"relay → dataset throughput, {label}, 1 worker", speed1, "flows/s", target=50_000
            ),
            Figure("collect", f"2 workers / 1 worker, {label}", speed2 / speed1, "x"),
            Figure(
                "collect",
                f"collector CPU time per flow, {label}, 1 worker",
                one["cpu_seconds"] / one["flows"] * 1e6,
                "us",
            ),
            *_stage_figures(one, f"{label}, 1 worker"),
            Figure(
                "collect", f"peak RSS of the collector, {label}, 1 worker", _mb(one["max_rss_bytes"]), "MB"
            ),
        ]
    first = runs[sizes[0], "2 workers"]
    naive_speed = naive["flows"] / naive["seconds"]
    speed = _rate(first)
    figures += [
        Figure(
            "collect",
            "relay CPU time per flow served",
            relay_cpu / max(served, 1) * 1e6,
            "us",
            note="the built-in relay shares the 2 cores",
        ),
        Figure(
            "collect", "naive client throughput", naive_speed, "flows/s", note=f"on {naive['flows']:,} flows"
        ),
        Figure("collect", "collect speed / naive client speed", speed / naive_speed, "x", target=3),
        Figure(
            "collect",
            "throughput with metrics on / off",
            speed / _rate(bare),
            "x",
            target=0.9,
            note="metrics cost at most 10% (2 workers)",
        ),
        Figure(
            "collect",
            "collector CPU time per flow for the metrics",
            (first["cpu_seconds"] / first["flows"] - bare["cpu_seconds"] / bare["flows"]) * 1e6,
            "us",
            note=f"{sizes[0] / 1e6:g}M flows, 2 workers: on {first['cpu_seconds'] / first['flows'] * 1e6:.1f}, off "
            f"{bare['cpu_seconds'] / bare['flows'] * 1e6:.1f} (what the ratio above costs, less the load's noise)",
        ),
        *_rollup_figures(first, rolled, sizes[0]),
    ]
    return figures


def _rollup_figures(plain: dict[str, Any], rolled: dict[str, Any], size: int) -> list[Figure]:
    """Collect's throughput with edge rollups on against the same run without, to the last batch each took."""
    from flowpipe.bench.context import Figure

    plain_rate = plain["flows"] / max(plain["batches_seconds"], 1e-9)
    rolled_rate = rolled["flows"] / max(rolled["batches_seconds"], 1e-9)
    built = f"{rolled['rollup_files']} of {rolled['flow_files']} flow files"
    return [
        Figure(
            "collect",
            f"throughput with edge rollups, {size / 1e6:g}M flows, 2 workers",
            rolled_rate,
            "flows/s",
            note=f"to the last batch taken, against {plain_rate:,.0f} without; rollups built in a thread at the "
            f"lowest priority: {built} had theirs when the collector stopped "
            f"({rolled['closing_seconds']:.1f} s after the last batch, of which up to 60 s waiting for them)",
        ),
        Figure(
            "collect",
            "throughput cost of edge rollups",
            100.0 * (plain_rate / rolled_rate - 1.0),
            "%",
            10.0,
            False,
            note=f"{rolled['cpu_seconds'] / rolled['flows'] * 1e6:.1f} CPU-us a flow with rollups (building them "
            f"included), {plain['cpu_seconds'] / plain['flows'] * 1e6:.1f} without",
        ),
    ]


# -- child processes --------------------------------------------------------------------------------------


def _relay_main(count: int, seed: int) -> None:
    from flowpipe._proto.flow import flow_pb2
    from flowpipe.bench.collect_relay import start_relay
    from flowpipe.sim import Simulator, SimulatorConfig

    started = time.perf_counter()
    pool_size = min(count, POOL_FLOWS)
    simulator = Simulator(
        SimulatorConfig(seed=seed, duration_seconds=600, rate_flows_per_second=pool_size / 600)
    )
    pool = [flow_pb2.Flow.FromString(data) for data in simulator.flow_bytes()][:pool_size]
    server = start_relay(pool, count, seed)
    print(f"ready {server.address} {time.perf_counter() - started:.1f}", flush=True)
    sys.stdin.close()
    threading.Event().wait()


def _statm_rss(pid: int | None) -> int:
    """Resident bytes of another process (0 once it is gone)."""
    if pid is None:
        return 0
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _rate(report: dict[str, Any]) -> float:
    """A collector run's flows a second once streaming (after its first batch: start-up is printed apart); the
    whole run's for a run too short to have more than one batch."""
    if report["stream_flows"] > 0 and report["stream_seconds"] > 0:
        return float(report["stream_flows"] / report["stream_seconds"])
    return float(report["flows"] / report["seconds"])


def _collector_main(
    address: str,
    dataset: str,
    count: int,
    metrics: bool = True,
    workers: int = 2,
    receiver: str = "http2",
    rollups: bool = False,
) -> dict[str, Any]:
    from flowpipe.app.collect import COLLECT_MAX_BATCH_BYTES, CollectConfig, collect, use_system_memory_pool
    from flowpipe.config import ParquetSinkConfig, PipelineConfig
    from flowpipe.model import EventBatch
    from flowpipe.sources.relay import RelaySource, RelaySourceConfig

    stop = threading.Event()
    received = 0
    first: list[tuple[float, int]] = []  # when the first batch came through, and its flows
    last: list[float] = [0.0]  # when the last batch came through (the sinks took it)
    samples: list[tuple[int, int]] = []
    sources: list[RelaySource] = []

    def count_batch(batch: EventBatch) -> None:
        nonlocal received
        received += batch.flows.num_rows
        last[0] = time.perf_counter()
        if not first:
            first.append((last[0], received))
        if received >= count:
            stop.set()

    def sample() -> None:
        last, since = -1, time.monotonic()
        while not stop.wait(0.25):
            receiver = sources[0].receiver_pid if sources else None
            samples.append((received, _rss_bytes() + _statm_rss(receiver)))
            if received != last:
                last, since = received, time.monotonic()
            elif time.monotonic() - since > 60:  # the relay has nothing more: stop rather than wait forever
                stop.set()

    use_system_memory_pool()  # as `flowpipe collect` does
    config = CollectConfig(
        source=RelaySourceConfig(address=address, field_mask=False, receiver=receiver),
        sink=ParquetSinkConfig(
            path=dataset, writer_id="bench", max_batch_bytes=COLLECT_MAX_BATCH_BYTES, edge_rollups=rollups
        ),
        pipeline=PipelineConfig(),
        question_interval_seconds=0,  # the periodic question is not part of the stream's path
        metrics_address="127.0.0.1:0" if metrics else None,
        workers=workers,
    )
    sampler = threading.Thread(target=sample, daemon=True)
    # (children's times add up over the process's life: what this run's receiving processes took is a difference)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, write_cpu = time.process_time(), time.thread_time()
    started = time.perf_counter()
    sampler.start()
    result = collect(
        config, stop=stop, on_batch=count_batch, on_started=lambda source, _: sources.append(source)
    )
    ended = time.perf_counter()
    seconds = ended - started
    write_cpu = time.thread_time() - write_cpu  # this thread ran the sinks (the pipeline's consumer)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the receiving process, ended and waited for
    children_cpu = children.ru_utime + children.ru_stime - children_before.ru_utime - children_before.ru_stime
    cpu = time.process_time() - cpu + children_cpu
    samples.append((received, _rss_bytes()))
    remote_decode_cpu = sources[0].remote_decode_seconds if sources else 0.0
    decode_cpu = (sources[0].decode_seconds if sources else 0.0) + remote_decode_cpu
    stages = {
        "decode": decode_cpu,
        "write": write_cpu,
        "receive": max(0.0, cpu - decode_cpu - write_cpu),
        "receiving process": children_cpu,
        "decode in the receiving process": remote_decode_cpu,
        "collector process": cpu - children_cpu,
    }
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = max([own_peak, *(rss for _, rss in samples)])
    from flowpipe.dataset.layout import Dataset
    from flowpipe.dataset.rollups import EDGES_TABLE

    stored = Dataset(dataset)
    return {
        # the batches' own rate, to the last batch the sinks took (not the closing flush, nor the rollups the
        # closing sink waits for)
        "batches_seconds": last[0] - first[0][0] if first else seconds,
        "flow_files": len(stored.list_part_files("flows")),
        "rollup_files": len(stored.list_part_files(EDGES_TABLE)) if rollups else 0,
        "closing_seconds": ended - last[0] if first else 0.0,
        "flows": result.pipeline.flows,
        "seconds": seconds,
        # the stream's own rate: from the first batch through (the processes started, the imports done, the
        # call made) to the last flow written
        "startup_seconds": first[0][0] - started if first else seconds,
        "stream_seconds": ended - first[0][0] if first else seconds,
        "stream_flows": result.pipeline.flows - first[0][1] if first else result.pipeline.flows,
        "cpu_seconds": cpu,
        "stages": stages,
        "rss_samples": samples,
        "max_rss_bytes": peak,
    }


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
    """Entry point of the bench children: `relay COUNT SEED`, `collector ADDRESS DATASET COUNT [on|off WORKERS
    RECEIVER [rollups]]`,
    `naive ADDRESS OUT LIMIT`; each prints one JSON report (the relay: `ready ADDRESS SECONDS`)."""
    task, *args = argv
    if task == "relay":
        _relay_main(int(args[0]), int(args[1]))
        return
    if task == "collector":
        workers = int(args[4]) if len(args) > 4 else 2
        receiver = args[5] if len(args) > 5 else "http2"
        report = _collector_main(
            args[0],
            args[1],
            int(args[2]),
            metrics=args[3:4] != ["off"],
            workers=workers,
            receiver=receiver,
            rollups=args[6:7] == ["rollups"],
        )
    elif task == "naive":
        report = _naive_main(args[0], args[1], int(args[2]))
    else:
        raise SystemExit(f"unknown bench task {task}")
    report.setdefault("max_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(report))
