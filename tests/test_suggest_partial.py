"""Partial drafts on real flows (ParquetSink → DuckDB → the shared edge definition → suggest): a connection the
current policy denied is never learned, pods recorded with a reserved identity and the API server are handled in
both formats, and everything else is drafted, validated and proved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from support.policy import flow, pod, reserved, validate_document
from support.suggest import connection, dataset

from flowpipe.cli import cli

WINDOW = ["--since", "2000-01-01", "--until", "2100-01-01"]
WEB = pod("shop", "web")
API = pod("shop", "api")
DB = pod("shop", "db")
KUBE_DNS_AS_WORLD = {  # a DNS pod Cilium knows only as the world (hostNetwork, or not managed)
    "namespace": "kube-system",
    "pod_name": "kube-dns-6f7b8c9d-q2w3e",
    "workload_name": "kube-dns",
    "identity": 2,
    "labels": ["reserved:world"],
    "ip": "10.156.0.10",
}
API_SERVER = reserved("kube-apiserver", "172.18.0.2")


def denied_connection(
    src: dict[str, Any], dst: dict[str, Any], port: int, sport: int
) -> list[dict[str, Any]]:
    """An ingress denial as real Hubble reports it: the source's node forwards the SYN to the overlay, the
    destination's node drops it (a drop notification and a policy-verdict event), and the SYN is retried."""
    five = {"source_port": sport, "tcp_flags": "SYN"}
    rows = [flow(src, dst, port, traffic_direction="EGRESS", trace_observation_point="TO_OVERLAY", **five)]
    for _ in range(2):  # the first SYN and one retransmit
        for event_type in (1, 5):
            rows.append(
                flow(
                    src,
                    dst,
                    port,
                    traffic_direction="INGRESS",
                    verdict="DROPPED",
                    drop_reason=133,
                    drop_reason_desc="POLICY_DENIED",
                    event_type=event_type,
                    **five,
                )
            )
    return rows


def traffic() -> list[dict[str, Any]]:
    return (
        connection(WEB, API, 8080, 40001)
        + denied_connection(WEB, DB, 5432, 40002)
        + [flow(WEB, KUBE_DNS_AS_WORLD, 53, "UDP", source_port=51000 + i) for i in range(3)]
        + connection(API, API_SERVER, 6443, 40003)
    )


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, ["suggest", *args])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dataset(tmp_path_factory.mktemp("partial") / "data", traffic())


@pytest.mark.parametrize("fmt", ["cilium", "kubernetes"])
def test_partial_drafts_list_what_they_left_out_and_never_allow_the_denied_edge(
    root: Path, fmt: str, cilium_schemas: Path, tmp_path: Path
) -> None:
    result = run(
        "--dataset", str(root), *WINDOW, "--format", fmt, "--out", str(tmp_path), "--summary-format", "json"
    )
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout)
    assert summary["partial"] is True
    docs = [d for p in sorted(tmp_path.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    for doc in docs:
        validate_document(doc, cilium_schemas)
    text = yaml.safe_dump(docs)
    # The denied connection is kept denied: listed, never learned (db gets no rule for 5432 from web).
    [denied] = summary["denied_kept_denied"]
    assert (
        denied["edge"] == "shop/web -> shop/db TCP/5432"
        and denied["reason"] == "denied by your current policy"
    )
    assert "5432" not in text
    # DNS to a pod recorded with the world identity: left out with what to do, never its address as a rule.
    shop = summary["namespaces"]["shop"]["formats"][fmt]
    [dns] = [lo for lo in shop["left_out"] if lo["kind"] == "reserved identity"]
    assert dns["edge"] == "shop/web -> kube-system/kube-dns UDP/53" and dns["requests"] == 3
    assert "pods recorded with the world identity: kube-system/kube-dns" in dns["reason"]
    assert "allow it by label once Cilium manages it" in dns["what_to_do"]
    assert "10.156.0.10" not in text and "0.0.0.0/0" not in text and "world" not in text
    assert {lo["kind"] for lo in shop["left_out"]} == {"reserved identity"}  # nothing else: all proved
    # The rest is drafted: web, api and the namespace's default-deny, covering web → api and api → API server.
    assert set(shop["policies"]) == {"flowpipe-default-deny", "flowpipe-web", "flowpipe-api"}
    assert shop["requests_covered"] == 2
    assert shop["replay"] == {"learned_requests_allowed": 2, "learned_requests_denied": 3}
    api_egress = next(d for d in docs if d["metadata"]["name"] == "flowpipe-api")["spec"]["egress"]
    shop_file = (tmp_path / "shop.yaml").read_text()
    if fmt == "kubernetes":
        assert {"ipBlock": {"cidr": "172.18.0.2/32"}} in [peer for rule in api_egress for peer in rule["to"]]
        assert "# note: kube-apiserver is written as the API server addresses seen" in shop_file
    else:
        assert {
            "toEntities": ["kube-apiserver"],
            "toPorts": [{"ports": [{"port": "6443", "protocol": "TCP"}]}],
        } in api_egress
    assert "assumes k8s-app=kube-dns in kube-system" in shop_file
    assert (
        "# left out: shop/web -> kube-system/kube-dns UDP/53: pods recorded with the world identity"
        in shop_file
    )


def test_learn_from_drops_learns_the_denied_connection(root: Path) -> None:
    result = run("--dataset", str(root), *WINDOW, "--learn-from-drops", "--summary-format", "json")
    assert result.exit_code == 3, result.output  # the world-identity DNS pod is still left out
    db = next(d for d in yaml.safe_load_all(result.stdout) if d["metadata"]["name"] == "flowpipe-db")
    assert db["spec"]["ingress"][0]["toPorts"] == [{"ports": [{"port": "5432", "protocol": "TCP"}]}]
    summary = json.loads(result.stderr[result.stderr.index("{") :])
    assert summary["denied_kept_denied"] == []


def test_the_text_summary_is_the_review(root: Path) -> None:
    result = run("--dataset", str(root), *WINDOW)
    assert result.exit_code == 3
    lines = result.stderr.splitlines()
    shop = lines.index("namespace shop:")
    assert lines[shop + 1].startswith(
        "  cilium: 3 policies (flowpipe-default-deny, flowpipe-api, flowpipe-web), 2 requests covered "
        "(replay denies 3 learned requests, those left out); 1 edges left out"
    )
    assert "  1 edges denied by your current policy, left out (kept denied):" in lines
    assert "    shop/web -> shop/db TCP/5432 (1 requests)" in lines
    assert lines[-1] == "partial: some edges were left out (listed above); exit status 3"
