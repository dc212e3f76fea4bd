"""The `s3` section of `flowpipe bench`: requests an object store receives per flush, counted at the server.

A local S3-compatible server (moto's, from the `dev` extra; the section is skipped without it) runs in a child
process on 127.0.0.1, behind a WSGI layer that counts every request it answers by kind: object PUTs (and among
them zero-byte folder markers), multipart uploads, server-side copies, HEADs, listings, GETs and DELETEs. The
parent writes flushes with the real Parquet sink through pyarrow's S3 filesystem and reads the counts back
(`GET /_flowpipe/requests`), so the figures are what a real store would bill, not what the code believes it
asked for. Tests use the same server (`counting_s3_server`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from flowpipe.bench.context import BenchContext, Figure

COUNTS_PATH = "/_flowpipe/requests"
RESET_PATH = "/_flowpipe/reset"
FLUSHES = 5
FLOWS_PER_FLUSH = 2_000


def request_kind(method: str, path: str, query: str, headers: dict[str, str]) -> str:
    """The kind of one S3 request, as counted: `put`, `put_marker`, `copy`, `multipart_*`, `head`, `list`, ..."""
    params = parse_qs(query, keep_blank_values=True)
    if method == "PUT" and "x-amz-copy-source" in headers:
        return "copy"
    if method == "PUT" and "partNumber" in params:
        return "multipart_part"
    if method == "POST" and "uploads" in params:
        return "multipart_start"
    if method == "POST" and "uploadId" in params:
        return "multipart_complete"
    if method == "PUT":
        key = path.lstrip("/").partition("/")[2]
        empty = headers.get("content-length", "0") == "0"
        return "put_marker" if key.endswith("/") or (empty and not key) else "put"
    if method == "GET" and ("list-type" in params or path.strip("/").count("/") == 0):
        return "list"
    return {"GET": "get", "HEAD": "head", "DELETE": "delete"}.get(method, method.lower())


def _serve() -> None:  # the child process: moto's app behind the counter, until stdin closes
    import threading

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def counting(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path in (COUNTS_PATH, RESET_PATH):
            with lock:
                body = json.dumps(dict(counts)).encode()
                if path == RESET_PATH:
                    counts.clear()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        headers["content-length"] = environ.get("CONTENT_LENGTH") or "0"
        kind = request_kind(environ["REQUEST_METHOD"], path, environ.get("QUERY_STRING", ""), headers)
        with lock:
            counts[kind] += 1
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counting, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()
    server.shutdown()


@contextmanager
def counting_s3_server() -> Iterator[str]:
    """A counting moto S3 server in a child process; yields its endpoint URL (`http://127.0.0.1:PORT`)."""
    code = "from flowpipe.bench.s3 import _serve; _serve()"
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdout is not None and process.stdin is not None
    try:
        line = process.stdout.readline()
        if not line.strip():
            raise RuntimeError("the counting S3 server did not start (is moto installed?)")
        yield f"http://127.0.0.1:{int(line)}"
    finally:
        process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def request_counts(endpoint: str, *, reset: bool = False) -> Counter[str]:
    """The requests counted so far by kind (and, with `reset`, start counting from zero)."""
    with urllib.request.urlopen(endpoint + (RESET_PATH if reset else COUNTS_PATH), timeout=10) as answer:
        return Counter(json.loads(answer.read()))


def bench_s3(ctx: BenchContext) -> list[Figure]:
    """Requests per flush of the Parquet sink to an S3-compatible server, by kind; no folder markers."""

    try:
        import moto.server  # noqa: F401
    except ImportError:
        return [
            Figure("s3", "requests per flush", None, "requests", note="moto not installed (the dev extra)")
        ]
    with counting_s3_server() as endpoint:
        per_flush, counts = count_flush_requests(endpoint, flushes=FLUSHES, rows=FLOWS_PER_FLUSH)
    kinds = ", ".join(f"{kind} {n / FLUSHES:g}" for kind, n in sorted(counts.items()))
    return [
        Figure(
            "s3", "requests per flush", per_flush, "requests", target=4, higher_is_better=False, note=kinds
        ),
        Figure(
            "s3",
            "folder-marker PUTs per flush",
            counts["put_marker"] / FLUSHES,
            "requests",
            target=0.5,
            higher_is_better=False,
        ),
    ]


def count_flush_requests(endpoint: str, *, flushes: int, rows: int) -> tuple[float, Counter[str]]:
    """Write `flushes` flushes of `rows` flows each (one hour, one part file each) with the Parquet sink into a
    fresh bucket at `endpoint`; returns the requests per flush and the counts by kind (sink set-up excluded)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from flowpipe.config import ParquetSinkConfig
    from flowpipe.dataset.layout import Dataset
    from flowpipe.dataset.storage import S3Options, s3_filesystem
    from flowpipe.model import FLOW_SCHEMA, EventBatch
    from flowpipe.sinks.parquet import ParquetSink

    environ = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    filesystem = s3_filesystem(S3Options(endpoint=endpoint, region="us-east-1"), environ=environ)
    bucket = f"bench-{int(time.time() * 1000)}"
    pafs.S3FileSystem(
        endpoint_override=endpoint.removeprefix("http://"),
        scheme="http",
        region="us-east-1",
        access_key="bench",
        secret_key="bench",
        allow_bucket_creation=True,
    ).create_dir(bucket)
    dataset = Dataset(f"{bucket}/bench", filesystem=filesystem)
    # the flow part file's own requests (an edge rollup adds two PUTs: see flowpipe.dataset.rollups)
    config = ParquetSinkConfig(
        path=f"s3://{bucket}/bench", writer_id="bench", max_batch_rows=rows, edge_rollups=False
    )
    sink = ParquetSink(config, dataset=dataset)
    start = datetime(2024, 3, 1, 10, tzinfo=UTC)
    request_counts(endpoint, reset=True)
    for flush in range(flushes):
        values: dict[str, Any] = {
            name: pa.nulls(rows, f.type) for name, f in zip(FLOW_SCHEMA.names, FLOW_SCHEMA)
        }
        times = [start + timedelta(minutes=flush, milliseconds=i) for i in range(rows)]
        values["time"] = pa.array(times, FLOW_SCHEMA.field("time").type)
        values["uuid"] = pa.array([f"{flush}-{i}" for i in range(rows)])
        sink.write(EventBatch(flows=pa.table(values, schema=FLOW_SCHEMA)))
        sink.flush()
    counts = request_counts(endpoint)
    return sum(counts.values()) / flushes, counts
