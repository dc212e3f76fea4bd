"""`flowpipe suggest` end to end: files or stdout, summary, refusal, stable output, and --existing additions."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner
from support.policy import flow, pod, reserved
from support.suggest import connection, dataset, dns_server, documents, suggest

from flowpipe.cli import cli
from flowpipe.policy.load import load_policies, parse_policies
from flowpipe.policy.replay import replay_flows
from flowpipe.query import DuckDBEngine

WEB = pod("shop", "web")
API = pod("shop", "api")
DB = pod("shop", "db")
PROM = pod("monitoring", "prometheus")
WINDOW = ["--since", "2000-01-01", "--until", "2100-01-01"]


def traffic() -> list[dict[str, object]]:
    return (
        connection(WEB, API, 8080, 40001)
        + connection(API, DB, 5432, 40002)
        + connection(PROM, API, 9090, 40003)
        + [flow(WEB, dns_server(), 53, "UDP", source_port=51000)]
        + [flow(API, reserved("world", "198.51.100.1", names=["api.stripe.com"]), 443, source_port=40004)]
    )


def run(*args: str) -> object:
    return CliRunner().invoke(cli, ["suggest", *args])


def test_prints_the_drafts_and_a_summary_apart(tmp_path: Path) -> None:
    root = dataset(tmp_path / "data", traffic())
    result = run("--dataset", str(root), *WINDOW)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    docs = list(yaml.safe_load_all(result.stdout))  # type: ignore[attr-defined]
    names = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs}
    assert names == {
        ("shop", "flowpipe-default-deny"),
        ("shop", "flowpipe-web"),
        ("shop", "flowpipe-api"),
        ("shop", "flowpipe-db"),
        ("monitoring", "flowpipe-default-deny"),
        ("monitoring", "flowpipe-prometheus"),
    }
    stderr = result.stderr  # type: ignore[attr-defined]
    assert "learned 5 requests in 5 edges" in stderr and "cilium: 6 CiliumNetworkPolicy documents" in stderr
    assert "apiVersion" not in stderr


def test_writes_one_file_per_namespace_or_workload_and_the_same_bytes_every_time(tmp_path: Path) -> None:
    root = dataset(tmp_path / "data", traffic())
    out = tmp_path / "drafts"
    for folder in (out / "a", out / "b"):
        result = run("--dataset", str(root), *WINDOW, "--format", "both", "--out", str(folder))
        assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    files = sorted(str(p.relative_to(out / "a")) for p in (out / "a").rglob("*.yaml"))
    assert files == [
        "cilium/monitoring.yaml",
        "cilium/shop.yaml",
        "kubernetes/monitoring.yaml",
        "kubernetes/shop.yaml",
    ]
    assert all((out / "a" / f).read_bytes() == (out / "b" / f).read_bytes() for f in files)
    header = (out / "a" / "cilium/shop.yaml").read_text().splitlines()[:3]
    assert header[0] == "# flowpipe suggest: CiliumNetworkPolicy drafts for namespace shop"
    assert header[1].startswith("# learned from 5 requests in 5 edges, observed 2024-05-01T10:00:00Z ..")
    result = run("--dataset", str(root), *WINDOW, "--per-workload", "--out", str(out / "c"))
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert sorted(str(p.relative_to(out / "c")) for p in (out / "c").rglob("*.yaml")) == [
        "monitoring/flowpipe-default-deny.yaml",
        "monitoring/flowpipe-prometheus.yaml",
        "shop/flowpipe-api.yaml",
        "shop/flowpipe-db.yaml",
        "shop/flowpipe-default-deny.yaml",
        "shop/flowpipe-web.yaml",
    ]


def test_an_edge_that_cannot_be_drafted_is_left_out_and_the_rest_written_with_exit_3(tmp_path: Path) -> None:
    legacy = {
        "namespace": "shop",
        "pod_name": "legacy-7c9f8d",
        "workload_name": "legacy",
        "identity": 7777,
        "labels": ["k8s:io.kubernetes.pod.namespace=shop"],
        "ip": "10.0.4.44",
    }
    root = dataset(tmp_path / "data", traffic() + connection(legacy, API, 8080, 40009))
    partial = run("--dataset", str(root), *WINDOW, "--out", str(tmp_path / "out"))
    assert partial.exit_code == 3, partial.output  # type: ignore[attr-defined]
    stderr = partial.stderr  # type: ignore[attr-defined]
    assert "left out (no stable labels): shop/legacy has no stable labels" in stderr
    assert "shop/legacy -> shop/api TCP/8080" in stderr and "exit status 3" in stderr
    # Everything else is drafted and written, shop included, and the shop file names what it left out.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["monitoring.yaml", "shop.yaml"]
    shop = (tmp_path / "out" / "shop.yaml").read_text()
    assert "# left out: shop/legacy -> shop/api TCP/8080: shop/legacy has no stable labels" in shop
    assert {d["metadata"]["name"] for d in yaml.safe_load_all(shop)} == {
        "flowpipe-default-deny", "flowpipe-web", "flowpipe-api", "flowpipe-db"}  # fmt: skip
    summary = run(
        "--dataset", str(root), *WINDOW, "--out", str(tmp_path / "out2"), "--summary-format", "json"
    )
    assert summary.exit_code == 3  # type: ignore[attr-defined]
    data = json.loads(summary.stdout)  # type: ignore[attr-defined]
    assert data["partial"] is True and data["exit_status"] == 3
    [left] = data["namespaces"]["shop"]["formats"]["cilium"]["left_out"]
    assert (left["edge"], left["kind"]) == ("shop/legacy -> shop/api TCP/8080", "no stable labels")
    assert left["what_to_do"].startswith("give its pods a stable label")
    assert data["namespaces"]["shop"]["formats"]["cilium"]["requests_covered"] == 5
    empty = run("--dataset", str(root), "--since", "2000-01-01", "--until", "2000-01-02")
    assert empty.exit_code == 1 and "no requests to learn from" in empty.output  # type: ignore[attr-defined]


EXISTING = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: flowpipe-api, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


def test_existing_policies_get_only_the_additions_they_lack(tmp_path: Path) -> None:
    rows = (
        connection(WEB, API, 8080, 40001)
        + connection(WEB, API, 9090, 40002)
        + connection(API, DB, 5432, 40003)
    )
    root = dataset(tmp_path / "data", rows)
    current = tmp_path / "policies"
    current.mkdir()
    (current / "api.yaml").write_text(EXISTING)
    for fmt in ("cilium", "kubernetes"):
        suggestion = suggest(root, formats=(fmt,), existing=(str(current),))
        # 8080 is allowed already; api's egress and db are not isolated by the existing policy
        assert suggestion.new_edges == ["shop/web -> shop/api TCP/9090 (denied at ingress)"]
        [doc] = documents(suggestion).values()
        assert doc["metadata"]["name"] == "flowpipe-api-2"  # never replaces the existing flowpipe-api
        spec = doc["spec"]
        rule_key = "fromEndpoints" if fmt == "cilium" else "from"
        assert len(spec["ingress"]) == 1 and rule_key in spec["ingress"][0] and "egress" not in spec
        if fmt == "cilium":
            assert spec["enableDefaultDeny"] == {"ingress": False, "egress": False}
            assert spec["ingress"][0]["toPorts"] == [{"ports": [{"port": "9090", "protocol": "TCP"}]}]
        else:
            assert spec["policyTypes"] == ["Ingress"] and spec["ingress"][0]["ports"] == [
                {"protocol": "TCP", "port": 9090}
            ]
        assert "additions to the existing policies" in suggestion.stream()
        # existing plus additions allow everything that was forwarded
        with DuckDBEngine(root) as engine:
            flows = engine.run("SELECT * FROM flows")
        combined = load_policies([current]) + parse_policies(suggestion.stream())
        assert replay_flows(combined, flows).would_break == 0
        assert replay_flows(load_policies([current]), flows).would_break > 0


def test_existing_policies_that_allow_everything_leave_nothing_to_add(tmp_path: Path) -> None:
    root = dataset(tmp_path / "data", connection(WEB, API, 8080, 40001))
    current = tmp_path / "api.yaml"
    current.write_text(EXISTING)
    result = run("--dataset", str(root), *WINDOW, "--existing", str(current))
    assert result.exit_code == 0 and result.stdout == ""  # type: ignore[attr-defined]
    assert "nothing new: the 1 existing policies allow every request" in result.stderr  # type: ignore[attr-defined]


def test_help_states_the_exit_status_and_the_summary_format() -> None:
    result = CliRunner().invoke(cli, ["suggest", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Exit status: 0 everything observed was drafted, 3 partial" in text
    assert "--summary-format [text|json]" in text
