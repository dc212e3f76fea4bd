"""Loading policy YAML: what is understood, and clear errors naming the file and document for what is not."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.policy import DB_NETWORK_POLICY

from flowpipe.errors import PolicyParseError
from flowpipe.policy.load import load_policies, parse_policies
from flowpipe.policy.model import ANY_PEER, Peer, Port

NETPOL = DB_NETWORK_POLICY


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_for(text: str) -> PolicyParseError:
    with pytest.raises(PolicyParseError) as info:
        parse_policies(text, path="policies/bad.yaml")
    return info.value


def test_multi_document_files_and_folders(tmp_path: Path) -> None:
    write(tmp_path, "a/one.yaml", NETPOL + "---\n" + NETPOL.replace("name: db", "name: db2") + "---\n")
    write(tmp_path, "a/b/two.yml", NETPOL.replace("name: db", "name: three"))
    write(tmp_path, "a/notes.txt", "not a policy")
    write(tmp_path, "a/.hidden.yaml", "::: not yaml")
    policies = load_policies([tmp_path / "a"])
    assert [p.name for p in policies] == ["three", "db", "db2"]  # sorted paths: a/b/two.yml before a/one.yaml
    assert policies[2].origin is not None and policies[2].origin.document_index == 1


def test_kubernetes_defaults() -> None:
    [policy] = parse_policies(NETPOL.replace("namespace: shop", "labels: {team: x}"), path="x.yaml")
    assert policy.namespace == "default"  # where kubectl apply puts it without -n
    assert policy.isolates == ("ingress",)  # policyTypes default: Ingress, plus Egress only with egress rules
    [rule] = policy.rules
    assert rule.ports[0].ports == (Port(5432, "TCP"),)
    [open_rule] = parse_policies(
        NETPOL.replace(
            "  - from: [{podSelector: {matchLabels: {app: api}}}]\n    ports: [{port: 5432}]", "  - {}"
        )
    )[0].rules
    assert open_rule.peers == (ANY_PEER,) and open_rule.ports == ()


def test_list_objects_are_unpacked() -> None:
    text = "apiVersion: v1\nkind: List\nitems:\n" + "".join(
        "- " + NETPOL.strip().replace("\n", "\n  ").replace("name: db", f"name: p{i}") + "\n"
        for i in range(2)
    )
    assert [p.name for p in parse_policies(text)] == ["p0", "p1"]


def test_cilium_specs_and_isolation() -> None:
    text = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: multi, namespace: shop}
specs:
- endpointSelector: {matchLabels: {app: a}}
  ingress: [{}]
- endpointSelector: {matchLabels: {app: b}}
  egress:
  - toPorts: [{ports: [{port: "53", protocol: UDP}]}]
  enableDefaultDeny: {egress: false}
"""
    first, second = parse_policies(text)
    assert first.isolates == ("ingress",) and first.rules[0].allows_nothing
    assert second.isolates == ()
    assert second.rules[0].peers == (ANY_PEER,)
    assert second.rule_ids() == ["specs[1].egress[0]"]


def test_cilium_peers_of_every_kind() -> None:
    text = """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: all-kinds}
spec:
  endpointSelector: {}
  egress:
  - toEndpoints: [{matchLabels: {app: x}}]
    toEntities: [world]
    toCIDR: [10.0.0.0/8]
    toCIDRSet: [{cidr: 192.168.0.0/16, except: [192.168.1.0/24]}]
    toFQDNs: [{matchName: a.example.com}]
  - toServices: [{k8sService: {serviceName: x, namespace: y}}]
    toPorts: [{ports: [{port: "80"}]}]
"""
    [policy] = parse_policies(text)
    assert policy.namespace is None and policy.clusterwide and policy.key == "all-kinds"
    kinds = [p.kind for p in policy.rules[0].peers]
    assert kinds == ["endpoints", "entity", "cidr", "cidr", "fqdn"]
    assert policy.rules[0].peers[3] == Peer.cidr_peer("192.168.0.0/16", ["192.168.1.0/24"])
    # toServices cannot be judged from flows: no peers (not "everyone"), and a note says so
    assert policy.rules[1].peers == ()
    assert any("toServices" in c for c in policy.comments)


def test_invalid_yaml_names_file_line_and_document() -> None:
    error = error_for(NETPOL + "---\nkind: NetworkPolicy\nmetadata: {name: [unclosed\n")
    assert error.path == "policies/bad.yaml" and error.document_index == 1
    assert "policies/bad.yaml (document 2)" in str(error) and "invalid YAML at line" in str(error)


def test_unknown_kind() -> None:
    error = error_for("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")
    assert error.document_index == 0
    assert "unknown kind 'Deployment'" in str(error) and "(document 1)" in str(error)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("metadata: {name: db, namespace: shop}", "metadata: {namespace: shop}"), "metadata.name"),
        (("  podSelector: {matchLabels: {app: db}}\n", ""), "spec.podSelector"),
        (("[{port: 5432}]", "[{port: 5432, protocol: ICMP}]"), "spec.ingress[0].ports[0].protocol"),
        (("[{port: 5432}]", "[{port: 70000}]"), "spec.ingress[0].ports[0].port"),
        (("{app: api}", "{app: 1}"), "spec.ingress[0].from[0].podSelector.matchLabels.app"),
        (
            ("[{podSelector: {matchLabels: {app: api}}}]", "[{ipBlock: {cidr: 10.0.0.0/33}}]"),
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (("[{podSelector: {matchLabels: {app: api}}}]", "[{podSelectr: {}}]"), "spec.ingress[0].from[0]"),
        (("apiVersion: networking.k8s.io/v1", "apiVersion: v1"), "apiVersion"),
    ],
)
def test_bad_kubernetes_fields_are_named(change: tuple[str, str], field: str) -> None:
    text = NETPOL.replace(*change)
    assert text != NETPOL
    error = error_for(text)
    assert f"policies/bad.yaml (document 1): {field}" in str(error)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("ingress: [{}]", "spec.endpointSelector"),
        ("endpointSelector: {}\negress: [{toEntities: [internet]}]", "spec.egress[0].toEntities[0]"),
        (
            "endpointSelector: {}\negress: [{toPorts: [{ports: [{port: '80', protocol: HTTP}]}]}]",
            "spec.egress[0].toPorts[0].ports[0].protocol",
        ),
        (
            "endpointSelector: {}\ningress: [{toPorts: [{rules: {http: [{path: '/a(('}]}}]}]",
            "spec.ingress[0].toPorts[0].rules.http[0].path",
        ),
        ("endpointSelector: {}\ningress: [{fromEndpoint: [{}]}]", "spec.ingress[0]"),
        (
            "endpointSelector: {}\ningressDeny: [{toPorts: [{rules: {http: [{}]}}]}]",
            "spec.ingressDeny[0].toPorts[0].rules",
        ),
        (
            "endpointSelector: {matchExpressions: [{key: a, operator: Maybe}]}\ningress: [{}]",
            "spec.endpointSelector.matchExpressions[0].operator",
        ),
    ],
)
def test_bad_cilium_fields_are_named(spec: str, field: str) -> None:
    text = (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x, namespace: y}\nspec:\n"
        + "".join(f"  {line}\n" for line in spec.splitlines())
    )
    error = error_for(NETPOL + "---\n" + text)
    assert error.document_index == 1
    assert f"(document 2): {field}" in str(error)


def test_missing_path_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyParseError, match="no such file"):
        load_policies([tmp_path / "nope.yaml"])
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"\xff\xfe\x00kind")
    with pytest.raises(PolicyParseError, match="latin1.yaml: cannot read"):
        load_policies([bad])


def test_empty_documents_are_skipped() -> None:
    assert len(parse_policies("---\n---\n" + NETPOL + "---\n# only a comment\n")) == 1
