"""Sections `ingest` and `baseline`: file ingest of the synthetic jsonpb file, and the naive approach beside it."""

from __future__ import annotations

from flowpipe.bench.context import BenchContext, Figure, folder_bytes, load_note, run_child


def bench_ingest(ctx: BenchContext) -> list[Figure]:
    """Throughput, peak memory and compression of `flowpipe ingest` on the synthetic file."""
    _, stats = ctx.jsonpb_file()
    load = load_note()
    report = ctx.ingest()
    flows, seconds = report["flows"], report["seconds"]
    dataset_bytes = folder_bytes(ctx.dataset / "flows")
    note = "" if flows == stats.flows else f"{flows:,} of {stats.flows:,} flows stored"
    return [
        Figure("ingest", "flows ingested", flows, "flows", target=stats.flows, note=note),
        Figure("ingest", "file ingest throughput", flows / seconds, "flows/s", target=100_000, note=load),
        Figure("ingest", "ingest CPU time per flow", 1e6 * report["cpu_seconds"] / max(flows, 1), "us"),
        Figure("ingest", "peak RSS of the ingest process", report["max_rss_bytes"] / 1e6, "MB", 500, False),
        Figure("ingest", "jsonpb bytes per flow", stats.bytes / max(stats.flows, 1), "B"),
        Figure("ingest", "dataset bytes per flow", dataset_bytes / max(flows, 1), "B"),
        Figure(
            "ingest",
            "jsonpb bytes / dataset bytes",
            stats.bytes / max(dataset_bytes, 1),
            "x smaller",
            target=25,
            note=f"{report['files']} part files",
        ),
    ]


def bench_baseline(ctx: BenchContext) -> list[Figure]:
    """How much faster ingest is than the obvious per-line Python approach."""
    path, _ = ctx.jsonpb_file()
    limit = min(ctx.flows, ctx.baseline_flows)
    ctx.log(f"naive baseline on the first {limit:,} flows (child process)")
    report = run_child("baseline", str(path), str(ctx.workdir / "baseline.parquet"), str(limit))
    baseline = report["flows"] / report["seconds"]
    ingest = ctx.ingest()
    speed = ingest["flows"] / ingest["seconds"]
    return [
        Figure(
            "baseline", "naive baseline throughput", baseline, "flows/s", note=f"on {report['flows']:,} flows"
        ),
        Figure("baseline", "peak RSS of the baseline process", report["max_rss_bytes"] / 1e6, "MB"),
        Figure("baseline", "ingest speed / baseline speed", speed / baseline, "x", target=5),
    ]
