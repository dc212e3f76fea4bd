"""serve-hubble: the stored flows over the Observer API, read by grpcio clients and the real Hubble CLI."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from google.protobuf import field_mask_pb2, json_format
from support.kept_fields import kept_line

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2, observer_pb2_grpc
from flowpipe.config import ParquetSinkConfig
from flowpipe.model import EventBatch, LostEvent
from flowpipe.query import DuckDBEngine
from flowpipe.server.history import HistoryServer
from flowpipe.server.tls import DEFAULT_SERVER_NAME, generate_test_pki
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.transforms.normalize import normalize_json_lines

HUBBLE = Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "hubble"
CAPTURES = ("kind-bookinfo", "kind-starwars", "gke-sample")


def _capture_lines(captures: Path) -> list[bytes]:
    lines: list[bytes] = []
    for name in CAPTURES:
        for path in sorted((captures / name).iterdir()):
            lines += [line for line in path.read_bytes().splitlines() if line.strip()]
    return lines


@pytest.fixture(scope="module")
def stored(
    hubble_captures: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, pa.Table, list[bytes]]:
    """A dataset of the real captures (written by the ParquetSink), its rows, and the lines they came from."""
    root = tmp_path_factory.mktemp("history")
    lines = _capture_lines(hubble_captures)
    events = normalize_json_lines(b"\n".join(lines) + b"\n")
    assert not events.errors
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id="t"))
    sink.write(EventBatch(flows=events.flows))
    sink.close()
    with DuckDBEngine(root) as engine:
        table = engine.run("SELECT * FROM flows ORDER BY time, node_name")
    return root, table, lines


@pytest.fixture(scope="module")
def server(stored: tuple[Path, pa.Table, list[bytes]]) -> Iterator[HistoryServer]:
    with HistoryServer(str(stored[0]), follow_interval=0.1) as running:
        yield running


@pytest.fixture()
def stub(server: HistoryServer) -> Iterator[observer_pb2_grpc.ObserverStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield observer_pb2_grpc.ObserverStub(channel)


def _flows(stub: observer_pb2_grpc.ObserverStub, **request: object) -> list[flow_pb2.Flow]:
    responses = stub.GetFlows(observer_pb2.GetFlowsRequest(**request), timeout=60)
    return [r.flow for r in responses if r.HasField("flow")]


def _times(table: pa.Table) -> list[int]:
    return table.column("time").cast(pa.int64()).to_pylist()


def _table_and_times(stored: tuple[Path, pa.Table, list[bytes]]) -> tuple[pa.Table, list[int]]:
    """The stored rows and their times in order."""
    return stored[1], sorted(_times(stored[1]))


def _flow_times(flows: list[flow_pb2.Flow]) -> list[int]:
    return [f.time.ToNanoseconds() for f in flows]


def _stamp(ns: int) -> object:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def test_status_nodes_and_namespaces_come_from_the_dataset(
    stub: observer_pb2_grpc.ObserverStub, stored: tuple[Path, pa.Table, list[bytes]]
) -> None:
    table = stored[1]
    status = stub.ServerStatus(observer_pb2.ServerStatusRequest())
    assert status.num_flows == table.num_rows
    nodes = {n.name: n.num_flows for n in stub.GetNodes(observer_pb2.GetNodesRequest()).nodes}
    expected: dict[str, int] = {}
    for name in table.column("node_name").to_pylist():
        expected[name] = expected.get(name, 0) + 1
    assert nodes == expected
    assert status.num_connected_nodes.value == len(expected)
    namespaces = {
        (n.cluster, n.namespace) for n in stub.GetNamespaces(observer_pb2.GetNamespacesRequest()).namespaces
    }
    wanted = set(table.column("source_namespace").drop_null().to_pylist()) | set(
        table.column("destination_namespace").drop_null().to_pylist()
    )
    assert {ns for _, ns in namespaces} == wanted


def test_health_check_serves(server: HistoryServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        assert check(b"") == b"\x08\x01"  # SERVING
        with pytest.raises(grpc.RpcError) as info:
            check(b"\x0a\x03abc")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_number_first_since_until(
    stub: observer_pb2_grpc.ObserverStub, stored: tuple[Path, pa.Table, list[bytes]]
) -> None:
    times = sorted(_times(stored[1]))
    assert _flow_times(_flows(stub, number=20)) == times[-20:]
    assert _flow_times(_flows(stub, number=7, first=True)) == times[:7]
    assert _flow_times(_flows(stub)) == times
    since, until = times[100], times[400]
    window = [t for t in times if since <= t <= until]
    assert _flow_times(_flows(stub, since=_stamp(since), until=_stamp(until))) == window
    assert _flow_times(_flows(stub, since=_stamp(since), until=_stamp(until), number=5)) == window[:5]
    assert _flow_times(_flows(stub, until=_stamp(until), number=5)) == [t for t in times if t <= until][-5:]


def _expect(table: pa.Table, mask: pa.Array) -> list[int]:
    return sorted(_times(table.filter(mask)))


def test_filters_match_answers_computed_from_the_table(
    stub: observer_pb2_grpc.ObserverStub, stored: tuple[Path, pa.Table, list[bytes]]
) -> None:
    t = stored[1]
    cases = [
        (flow_pb2.FlowFilter(source_pod=["kube-system/"]), pc.equal(t["source_namespace"], "kube-system")),
        (flow_pb2.FlowFilter(destination_pod=["bookinfo/reviews"]),
         pc.and_(pc.equal(t["destination_namespace"], "bookinfo"), pc.starts_with(t["destination_pod_name"], "reviews"))),
        (flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED]), pc.equal(t["verdict"], "DROPPED")),
        (flow_pb2.FlowFilter(protocol=["udp"]), pc.equal(t["l4_protocol"], "UDP")),
        (flow_pb2.FlowFilter(protocol=["http"]), pc.equal(t["l7_protocol"], "http")),
        (flow_pb2.FlowFilter(destination_port=["9080"]), pc.equal(t["destination_port"], 9080)),
        (flow_pb2.FlowFilter(source_ip=["10.244.0.206"]), pc.equal(t["source_ip"], "10.244.0.206")),
        (flow_pb2.FlowFilter(destination_label=["k8s:app=reviews"]),
         pc.greater(pc.list_value_length(pc.list_filter(t["destination_labels"], "k8s:app=reviews")) if False else
                    pa.array([("k8s:app=reviews" in v) for v in t["destination_labels"].to_pylist()]), False)),
    ]  # fmt: skip
    for flt, mask in cases:
        expected = _expect(t, pc.fill_null(mask, False))
        assert expected, flt
        assert _flow_times(_flows(stub, whitelist=[flt])) == expected, flt
    # blacklist: everything but UDP
    not_udp = _expect(t, pc.invert(pc.fill_null(pc.equal(t["l4_protocol"], "UDP"), False)))
    assert _flow_times(_flows(stub, blacklist=[flow_pb2.FlowFilter(protocol=["udp"])])) == not_udp


def test_filters_over_what_is_not_stored_are_unimplemented(stub: observer_pb2_grpc.ObserverStub) -> None:
    for flt in (flow_pb2.FlowFilter(http_header=[flow_pb2.HTTPHeader(key="a", value="b")]),
                flow_pb2.FlowFilter(node_labels=["a=b"]), flow_pb2.FlowFilter(source_service=["ns/svc"])):  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            _flows(stub, blacklist=[flt])
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_field_mask(stub: observer_pb2_grpc.ObserverStub) -> None:
    flows = _flows(stub, number=3, field_mask=field_mask_pb2.FieldMask(paths=["time", "verdict"]))
    assert len(flows) == 3
    for f in flows:
        assert f.HasField("time") and f.verdict and not f.HasField("source") and not f.node_name


def test_follow_sends_flows_of_part_files_published_later(
    stored: tuple[Path, pa.Table, list[bytes]], tmp_path: Path
) -> None:
    root, table, _ = stored
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(root, copy)
    later = table.slice(0, 10).set_column(
        0, "time", pc.add(table["time"].slice(0, 10), pa.scalar(365 * 86_400 * 10**9, pa.duration("ns")))
    )
    with (
        HistoryServer(str(copy), follow_interval=0.05) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = observer_pb2_grpc.ObserverStub(channel)
        stream = stub.GetFlows(observer_pb2.GetFlowsRequest(number=2, follow=True), timeout=60)
        got: list[int] = []
        for response in stream:
            if not response.HasField("flow"):
                continue
            got.append(response.flow.time.ToNanoseconds())
            if len(got) == 2:
                sink = ParquetSink(ParquetSinkConfig(path=str(copy), writer_id="later"))
                sink.write(EventBatch(flows=later))
                sink.close()
            if len(got) == 12:
                break
        stream.cancel()
    assert got == sorted(_times(table))[-2:] + sorted(_times(later))


# -- the real Hubble CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hubble() -> str:
    if not HUBBLE.is_file():
        pytest.skip("the Hubble CLI (../shared/tools/hubble) is not present")
    return str(HUBBLE)


def _hubble(hubble: str, server: HistoryServer, *args: str) -> str:
    result = subprocess.run(
        [hubble, *args, "--server", server.address], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.external
def test_hubble_status_and_list_nodes(
    hubble: str, server: HistoryServer, stored: tuple[Path, pa.Table, list[bytes]]
) -> None:
    status = _hubble(hubble, server, "status")
    assert f"Current/Max Flows: {stored[1].num_rows:,}/{stored[1].num_rows:,}" in status
    nodes = _hubble(hubble, server, "list", "nodes")
    for name in set(stored[1].column("node_name").to_pylist()):
        assert name in nodes


@pytest.mark.external
def test_hubble_observe_gives_back_the_lines_it_was_given(
    hubble: str, server: HistoryServer, stored: tuple[Path, pa.Table, list[bytes]]
) -> None:
    out = _hubble(hubble, server, "observe", "--all", "-o", "jsonpb").splitlines()

    def without_uuid(line: str | bytes) -> str:
        # This 2023 CLI predates the `uuid` field and leaves it out (the grpcio tests compare it).
        value = kept_line(line)
        value.pop("uuid", None)
        return json.dumps(value, sort_keys=True)

    received = sorted(without_uuid(line) for line in stored[2])
    served = sorted(without_uuid(line) for line in out)
    assert served == received


@pytest.mark.external
def test_hubble_observe_windows_and_filters(
    hubble: str, server: HistoryServer, stored: tuple[Path, pa.Table, list[bytes]]
) -> None:
    table, times = _table_and_times(stored)

    def observe(*args: str) -> list[int]:
        lines = _hubble(hubble, server, "observe", "-o", "jsonpb", *args).splitlines()
        return [
            json_format.Parse(line, observer_pb2.GetFlowsResponse()).flow.time.ToNanoseconds()
            for line in lines
        ]

    assert observe("--last", "15") == times[-15:]
    assert observe("--first", "4") == times[:4]
    since, until = times[50], times[300]

    def rfc3339(ns: int) -> str:
        return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    low, high = (since // 10**9) * 10**9, (until // 10**9) * 10**9
    expected = [t for t in times if low <= t <= high]
    assert observe("--since", rfc3339(since), "--until", rfc3339(until), "--all") == expected
    dropped = _expect(table, pc.fill_null(pc.equal(table["verdict"], "DROPPED"), False))
    assert observe("--verdict", "DROPPED", "--all") == dropped
    kube = _expect(table, pc.fill_null(pc.equal(table["destination_namespace"], "kube-system"), False))
    assert observe("--to-namespace", "kube-system", "--all") == kube


def test_lost_events_come_in_time_order_among_the_flows(
    stored: tuple[Path, pa.Table, list[bytes]], tmp_path: Path
) -> None:
    table = stored[1].slice(0, 200)
    times = _times(table)
    middle, late = times[100], times[150]
    events = [
        LostEvent(source="HUBBLE_RING_BUFFER", num_events_lost=7, node_name="kind-worker", cpu=1,
                  time=datetime.fromtimestamp(middle / 1e9, UTC)),
        LostEvent(source="PERF_EVENT_RING_BUFFER", num_events_lost=3, node_name="kind-control-plane",
                  time=datetime.fromtimestamp(late / 1e9, UTC)),
    ]  # fmt: skip
    sink = ParquetSink(ParquetSinkConfig(path=str(tmp_path), writer_id="t"))
    sink.write(EventBatch(flows=table, lost_events=events))
    sink.close()
    stored_lost = [
        e["time"]
        for e in DuckDBEngine(tmp_path)
        .run("SELECT epoch_ns(time) AS time FROM lost_events ORDER BY 1")
        .to_pylist()
    ]
    with HistoryServer(str(tmp_path)) as server, grpc.insecure_channel(server.address) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        responses = [
            r
            for r in stub.GetFlows(observer_pb2.GetFlowsRequest(), timeout=60)
            if not r.HasField("node_status")
        ]
        kinds = [(r.WhichOneof("response_types"), r.time.ToNanoseconds()) for r in responses]
        assert [t for _, t in kinds] == sorted(t for _, t in kinds)
        lost = [r for r in responses if r.HasField("lost_events")]
        assert [(r.lost_events.num_events_lost, r.node_name, r.time.ToNanoseconds()) for r in lost] == [
            (7, "kind-worker", stored_lost[0]),
            (3, "kind-control-plane", stored_lost[1]),
        ]
        assert (
            lost[0].lost_events.source == flow_pb2.HUBBLE_RING_BUFFER and lost[0].lost_events.cpu.value == 1
        )
        # the last 20 flows come after both losses: none is sent with them
        last = list(stub.GetFlows(observer_pb2.GetFlowsRequest(number=20), timeout=60))
        assert not any(r.HasField("lost_events") for r in last)


def test_collect_from_serve_hubble_reproduces_the_dataset(
    stored: tuple[Path, pa.Table, list[bytes]], server: HistoryServer, tmp_path: Path
) -> None:
    from support.collect import background_collect, fast_collect_config
    from support.wait import wait_until

    table = stored[1]
    copy = tmp_path / "copy"
    with background_collect(fast_collect_config(server.address, copy)) as running:

        def copied() -> int:
            try:
                with DuckDBEngine(copy) as engine:
                    return int(engine.run("SELECT count(*) AS n FROM flows")["n"][0].as_py())
            except Exception:  # noqa: BLE001  (not written yet)
                return 0

        wait_until(lambda: copied() >= table.num_rows, what="every stored flow collected again")
        running.stop()
    order = "ORDER BY time, node_name, source_ip, destination_ip, source_port, destination_port, uuid"
    with DuckDBEngine(copy) as engine:
        again = engine.run(f"SELECT * FROM flows {order}")
    with DuckDBEngine(stored[0]) as engine:
        original = engine.run(f"SELECT * FROM flows {order}")
    assert again.num_rows == original.num_rows
    for name in original.schema.names:
        assert again.column(name).equals(original.column(name)), name


def test_mutual_tls(stored: tuple[Path, pa.Table, list[bytes]], tmp_path: Path) -> None:
    pki = generate_test_pki(tmp_path / "pki")
    with HistoryServer(str(stored[0]), tls=pki.server_tls(mutual=True)) as server:
        options = [("grpc.ssl_target_name_override", DEFAULT_SERVER_NAME)]

        def last(cert: Path | None, key: Path | None) -> int:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=pki.ca_cert.read_bytes(),
                private_key=key.read_bytes() if key else None,
                certificate_chain=cert.read_bytes() if cert else None,
            )
            with grpc.secure_channel(server.address, credentials, options=options) as channel:
                return len(_flows(observer_pb2_grpc.ObserverStub(channel), number=3))

        assert last(pki.client_cert, pki.client_key) == 3
        with pytest.raises(grpc.RpcError) as info:
            last(pki.other_client_cert, pki.other_client_key)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_command_serves_flows_metrics_and_health(stored: tuple[Path, pa.Table, list[bytes]]) -> None:
    import re
    import signal
    import sys
    import urllib.request

    process = subprocess.Popen(
        [sys.executable, "-m", "flowpipe", "serve-hubble", "--dataset", str(stored[0]), "--listen",
         "127.0.0.1:0", "--metrics-address", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first, second = process.stdout.readline(), process.stdout.readline()
        address = re.search(r"on (127\.0\.0\.1:\d+)", first)
        metrics = re.search(r"(http://127\.0\.0\.1:\d+)/metrics", second)
        assert address and metrics, (first, second)
        with grpc.insecure_channel(address.group(1)) as channel:
            assert len(_flows(observer_pb2_grpc.ObserverStub(channel), number=5)) == 5
        with urllib.request.urlopen(metrics.group(1) + "/healthz", timeout=10) as response:
            assert response.status == 200
        with urllib.request.urlopen(metrics.group(1) + "/metrics", timeout=10) as response:
            assert "flowpipe_serve_hubble_flows_sent 5.0" in response.read().decode()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def test_the_command_runs_without_pandas(stored: tuple[Path, pa.Table, list[bytes]]) -> None:
    """pyarrow would import pandas (tens of MB the server never uses) the first time it builds an array from a
    list; the command keeps it out, and serves all the same."""
    import sys

    code = (
        "import sys\n"
        "from flowpipe.cli._commands import COMMANDS\n"
        "COMMANDS['serve-hubble'].load()\n"
        "import pyarrow as pa\n"
        "from flowpipe.server.history import summarize\n"
        "from flowpipe.dataset.layout import Dataset\n"
        "pa.array(['a', 'b'])\n"
        "print(summarize(Dataset(sys.argv[1])).num_flows, 'pandas' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(stored[0])], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == [str(stored[1].num_rows), "False"]


@pytest.mark.external
def test_hubble_status_against_simulate_relay(hubble: str) -> None:
    from flowpipe.server import ObserverServer

    with ObserverServer(nodes=["kind-worker"]) as relay:
        result = subprocess.run(
            [hubble, "status", "--server", relay.address],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert "Healthcheck (via" in result.stdout


# -- a second gRPC implementation: Node's @grpc/grpc-js ----------------------------------------------------


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """@grpc/grpc-js and @grpc/proto-loader installed from npm into a temporary folder (skips without node)."""
    import shutil

    from support.env import REQUIRE_EXTERNAL

    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    folder = tmp_path_factory.mktemp("node-grpc")
    done = subprocess.run(
        ["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(folder),
         "@grpc/grpc-js", "@grpc/proto-loader"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        message = f"npm could not install @grpc/grpc-js: {done.stderr.strip()[-500:]}"
        if REQUIRE_EXTERNAL:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return folder / "node_modules"


@pytest.mark.external
def test_a_node_grpc_js_client_gets_the_same_answers(
    node_modules: Path, server: HistoryServer, stored: tuple[Path, pa.Table, list[bytes]]
) -> None:
    import os

    table, times = _table_and_times(stored)
    since, until = times[10], times[200]
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["node", str(root / "tests" / "node" / "observer_client.js"), server.address, str(root / "proto"),
         str(since), str(until), "kube-system"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "NODE_PATH": str(node_modules)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert int(answer["num_flows"]) == table.num_rows
    assert answer["nodes"] == sorted(set(table.column("node_name").to_pylist()))
    assert [int(t) for t in answer["last"]] == times[-10:]
    assert [int(t) for t in answer["first"]] == times[:3]
    assert [int(t) for t in answer["window"]] == [t for t in times if since <= t <= until]
    either = pc.or_(
        pc.fill_null(pc.equal(table["source_namespace"], "kube-system"), False),
        pc.fill_null(pc.equal(table["destination_namespace"], "kube-system"), False),
    )
    assert [int(t) for t in answer["filtered"]] == _expect(table, either)
    assert answer["unimplemented"] == grpc.StatusCode.UNIMPLEMENTED.value[0]


def test_a_compaction_under_a_running_answer_sends_each_flow_once(
    stored: tuple[Path, pa.Table, list[bytes]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="flowpipe.server.history")
    from flowpipe.dataset.compact import compact_dataset
    from flowpipe.dataset.layout import Dataset
    from flowpipe.server import history

    table = stored[1]
    sink = ParquetSink(ParquetSinkConfig(path=str(tmp_path), writer_id="t", max_batch_rows=100))
    for offset in range(0, table.num_rows, 100):
        sink.write(EventBatch(flows=table.slice(offset, 100)))
        sink.flush()
    sink.close()
    before = len(Dataset(tmp_path).list_part_files("flows"))
    request = history._Request(observer_pb2.GetFlowsRequest().SerializeToString())
    where, params, newest_first, limit = request.query()
    engine = history._WindowEngine(Dataset(tmp_path), None, None)
    reader = history._Reader(engine, request, where, params, newest_first, limit)
    try:
        got = list(reader.next() or [])
        report = compact_dataset(Dataset(tmp_path), grace_seconds=0)
        assert report.files_written and len(Dataset(tmp_path).list_part_files("flows")) < before
        while (batch := reader.next()) is not None:
            got.extend(batch)
    finally:
        reader.close()
    assert [t for t, _ in got] == sorted(_times(table))
    assert "vanished" in caplog.text  # the compacted inputs were gone when the reader came to them


def test_several_clusters_are_served_as_cluster_slash_node(
    stored: tuple[Path, pa.Table, list[bytes]], tmp_path: Path
) -> None:
    table = stored[1].slice(0, 300)
    east = table.slice(0, 150)
    east = east.set_column(east.schema.get_field_index("node_name"), "node_name", pa.array(["east/n1"] * 150))
    east = east.set_column(
        east.schema.get_field_index("cluster_name"), "cluster_name", pa.array(["east"] * 150)
    )
    west = table.slice(150)
    west = west.set_column(west.schema.get_field_index("node_name"), "node_name", pa.array(["n1"] * 150))
    west = west.set_column(
        west.schema.get_field_index("cluster_name"), "cluster_name", pa.array(["west"] * 150)
    )
    sink = ParquetSink(ParquetSinkConfig(path=str(tmp_path), writer_id="t"))
    sink.write(EventBatch(flows=pa.concat_tables([east, west])))
    sink.close()
    with HistoryServer(str(tmp_path)) as server, grpc.insecure_channel(server.address) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        nodes = {n.name: n.num_flows for n in stub.GetNodes(observer_pb2.GetNodesRequest()).nodes}
        assert nodes == {"east/n1": 150, "west/n1": 150}
        west_flows = _flows(stub, whitelist=[flow_pb2.FlowFilter(node_name=["west/*"])])
        assert {f.node_name for f in west_flows} == {"west/n1"}
        assert sorted(_flow_times(west_flows)) == sorted(_times(west))
        namespaces = stub.GetNamespaces(observer_pb2.GetNamespacesRequest()).namespaces
        assert {n.cluster for n in namespaces} == {"east", "west"}


@pytest.mark.external
def test_hubble_observe_follow_gets_flows_collected_later(
    hubble: str, stored: tuple[Path, pa.Table, list[bytes]], tmp_path: Path
) -> None:
    import queue
    import shutil
    import threading

    root, table, _ = stored
    copy = tmp_path / "ds"
    shutil.copytree(root, copy)
    year_ns = pa.scalar(365 * 86_400 * 10**9, pa.duration("ns"))
    later = table.slice(0, 5).set_column(0, "time", pc.add(table["time"].slice(0, 5), year_ns))
    with HistoryServer(str(copy), follow_interval=0.05) as server:
        process = subprocess.Popen(
            [hubble, "observe", "--server", server.address, "--follow", "--last", "1", "-o", "jsonpb"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        lines: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None
        threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()  # type: ignore[union-attr]
        try:
            got = [lines.get(timeout=60)]
            sink = ParquetSink(ParquetSinkConfig(path=str(copy), writer_id="later"))
            sink.write(EventBatch(flows=later))
            sink.close()
            got += [lines.get(timeout=60) for _ in range(5)]
        finally:
            process.terminate()
            process.wait(timeout=30)
    times = [
        json_format.Parse(line, observer_pb2.GetFlowsResponse()).flow.time.ToNanoseconds() for line in got
    ]
    assert times == sorted(_times(table))[-1:] + sorted(_times(later))
