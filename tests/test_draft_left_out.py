"""Partial drafts on hand-built edge rows: what a draft leaves out and says so (pods recorded with a reserved
identity, unlabelled in-cluster addresses, the API server in a NetworkPolicy), never a rule on one pod address and
never the world for an endpoint with pod labels; the replay of the drafts denies exactly the edges left out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from support.draft import DNS, WEB, edge, ent, policy, wl
from support.policy import validate_document

from flowpipe.app.suggest import split_denied
from flowpipe.policy.draft import cluster_ranges, draft_policies
from flowpipe.policy.edges import learned_requests
from flowpipe.policy.proof import as_deployed, prove_draft
from flowpipe.policy.render import policy_document, render_yaml

FLAVOURS = ("cilium", "kubernetes")


def held(end: dict[str, Any], identity: str, ip: str) -> dict[str, Any]:
    """A pod recorded with a reserved identity (hostNetwork, unmanaged): named as the pod, identity kept apart."""
    return {**end, "reserved_identity": identity, "ip": ip}


def labels_only(end: dict[str, Any]) -> dict[str, Any]:
    """A remote pod as a node without its metadata reports it: labels, no namespace, no workload."""
    return {"namespace": None, "workload": None, "labels": end["labels"]}


def proved(draft: Any, rows: list[dict[str, Any]], flavour: str) -> Any:
    subjects = {s for lo in draft.left_out for s in lo.subjects}
    return prove_draft(
        as_deployed(draft.policies), learned_requests(rows), flavour=flavour, left_out=subjects
    )


def peers(draft: Any) -> list[Any]:
    return [peer for p in draft.policies for rule in p.rules for peer in rule.peers]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_dns_server_recorded_with_the_world_identity_is_left_out_with_what_to_do(flavour: str) -> None:
    kube_dns = held(wl("kube-system", "kube-dns", k8s_app="kube-dns"), "world", "10.156.0.10")
    api = wl("shop", "api")
    rows = [edge(WEB, kube_dns, 53, "UDP", flows=12), edge(WEB, api, 8080, flows=5)]
    draft = draft_policies(rows, flavour=flavour)  # type: ignore[arg-type]
    [left] = draft.left_out
    assert left.kind == "reserved identity" and left.requests == 12
    assert left.edge == "shop/web -> kube-system/kube-dns UDP/53"
    assert "pods recorded with the world identity: kube-system/kube-dns (10.156.0.10)" in left.reason
    assert "allow it by label once Cilium manages it" in left.action
    assert ("toEntities: [host]" in left.action) == (flavour == "cilium")
    # The DNS allowance assumes the standard kube-dns selector, and says so; never the pod's address.
    deny = policy(draft, "shop", "flowpipe-default-deny")
    assert any("assumes k8s-app=kube-dns in kube-system" in c for c in deny.comments)
    assert not any(p.kind == "cidr" for p in peers(draft))
    assert "10.156.0.10" not in "".join(yaml.safe_dump(policy_document(p)) for p in draft.policies)
    # The replay denies exactly the edge left out (as expected); everything else is proved.
    proof = proved(draft, rows, flavour)
    assert not proof.broken and proof.requests == 5
    assert [(e.source, e.port) for e in proof.expected] == [("shop/web", 53)]


def test_an_unmanaged_pod_gets_no_policy_and_its_peers_no_rule_for_it() -> None:
    legacy = held(wl("shop", "legacy"), "unmanaged", "10.244.2.9")
    api = wl("shop", "api")
    rows = [edge(legacy, api, 8080, flows=3), edge(WEB, api, 8080, flows=4)]
    draft = draft_policies(rows)
    assert {p.name for p in draft.policies} == {"flowpipe-default-deny", "flowpipe-api", "flowpipe-web"}
    kinds = {(lo.subjects[0][0], lo.subjects[0][1]): lo for lo in draft.left_out}
    assert set(kinds) == {("shop/legacy", "egress"), ("shop/api", "ingress")}
    assert "restart the pod after Cilium runs" in kinds[("shop/api", "ingress")].action
    proof = proved(draft, rows, "cilium")
    assert not proof.broken and proof.requests == 4


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_unlabelled_address_inside_the_cluster_ranges_is_left_out_never_a_cidr(flavour: str) -> None:
    ranges = cluster_ranges(["10.244.1.5", "10.96.0.10", "not an address"])
    assert [str(r) for r in ranges] == ["10.96.0.0/16", "10.244.0.0/16"]
    rows = [
        edge(WEB, ent("world", "10.244.3.7"), 8080, flows=6),  # a pod whose record lacked its labels
        edge(WEB, ent("world", "203.0.113.9"), 443, flows=2),  # the internet
    ]
    draft = draft_policies(rows, flavour=flavour, cluster_ranges=ranges)  # type: ignore[arg-type]
    [left] = draft.left_out
    assert (
        left.kind == "in-cluster address" and "10.244.3.7 is an address inside 10.244.0.0/16" in left.reason
    )
    assert [p.cidr for p in peers(draft) if p.kind == "cidr"] == ["203.0.113.9/32"]
    proof = proved(draft, rows, flavour)
    assert not proof.broken and proof.requests == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_endpoint_with_pod_labels_and_no_namespace_is_selected_by_its_labels_never_the_world(
    flavour: str, cilium_schemas: Path
) -> None:
    tiefighter = wl("default", "tiefighter", {"class": "tiefighter", "org": "empire"})
    deathstar = wl("default", "deathstar", {"class": "deathstar", "org": "empire"})
    rows = [edge(labels_only(tiefighter), deathstar, 80, flows=19), edge(tiefighter, deathstar, 80, flows=23)]
    draft = draft_policies(rows, flavour=flavour)  # type: ignore[arg-type]
    assert not draft.left_out
    [rule] = policy(draft, "default", "flowpipe-deathstar").rules
    assert [p.kind for p in rule.peers] == ["endpoints"]
    text = render_yaml(draft.policies)
    assert "world" not in text and "0.0.0.0/0" not in text and "ipBlock" not in text
    for doc in yaml.safe_load_all(text):
        validate_document(doc, cilium_schemas)
    proof = proved(draft, rows, flavour)
    assert not proof.broken and proof.requests == 42


def test_the_kubernetes_format_writes_the_api_server_as_the_addresses_seen_with_a_comment() -> None:
    rows = [
        edge(WEB, ent("kube-apiserver", "172.18.0.2"), 6443, flows=4),
        edge(WEB, ent("kube-apiserver", "172.18.0.3"), 6443, flows=2),
    ]
    draft = draft_policies(rows, flavour="kubernetes")
    assert not draft.left_out
    web = policy(draft, "shop", "flowpipe-web")
    [rule] = policy_document(web)["spec"]["egress"]
    assert rule["to"] == [{"ipBlock": {"cidr": "172.18.0.2/32"}}, {"ipBlock": {"cidr": "172.18.0.3/32"}}]
    assert any("kube-apiserver is written as the API server addresses seen" in c for c in web.comments)
    proof = proved(draft, rows, "kubernetes")
    assert not proof.broken and proof.requests == 6


def test_edges_denied_by_the_current_policy_are_never_learned_unless_asked() -> None:
    api = wl("shop", "api")
    rows = [
        {**edge(WEB, api, 8080, flows=5), "status": "delivered"},
        {**edge(WEB, api, 5432, flows=3), "status": "denied"},
        edge(WEB, api, 9090, flows=1),  # no status column (an older edge table): delivered
    ]
    learn, denied = split_denied(rows)
    assert [r["destination_port"] for r in learn] == [8080, 9090]
    assert [r["destination_port"] for r in denied] == [5432]
    draft = draft_policies(learn)
    [ingress] = policy(draft, "shop", "flowpipe-api").rules
    assert [p.port for pr in ingress.ports for p in pr.ports] == [8080, 9090]
    assert split_denied(rows, learn_from_drops=True) == (rows, [])


def test_dns_to_a_managed_server_is_still_its_real_labels() -> None:
    draft = draft_policies([edge(WEB, DNS, 53, "UDP")])
    [rule] = policy(draft, "shop", "flowpipe-default-deny").rules
    assert rule.peers[0].selector is not None and dict(rule.peers[0].selector.match_labels) == {
        "k8s-app": "kube-dns"
    }
    assert not draft.left_out
