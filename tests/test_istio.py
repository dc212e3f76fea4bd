"""Istio AuthorizationPolicy drafts: accepted by istiod and Istio's CRD schema, meaning exactly what was seen.

Paths are drafted and replayed as the sidecar matches them (normalised first, `{*}` on Istio 1.22 and later),
callers are named by the service account in their labels wherever Hubble reported them, and the summary says
what the drafts assume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from support.policy import (
    AuthorizationPolicyError,
    istio_schema,
    istiod_path_error,
    pod,
    reserved,
    validate_authorization_policy,
)
from support.suggest import connection, suggest

from flowpipe.app.suggest import SuggestConfig, Suggestion
from flowpipe.config import ParquetSinkConfig
from flowpipe.errors import ConfigError
from flowpipe.policy._istio_paths import draft_paths, istiod_refuses, normalize_path, path_matches
from flowpipe.policy.istio import IstioPolicy, draft_authorization_policies, principal, unallowed_requests
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.sources.file import read_events

WEB = pod("shop", "web")
API = pod("shop", "api")
CRAFTED = [
    "/details/{id}",
    "/static/*",
    "/a/../admin",
    "/api/v1/carts/1",
    "/api/v1/carts/2",
    "/1/info",
    "/2/info",
]
"""Paths that broke the drafts before: braces, a literal *, dot segments, ids deep and in the first segment."""


def http(src: dict[str, Any], dst: dict[str, Any], path: str, method: str = "GET") -> dict[str, Any]:
    from support.policy import flow

    return flow(src, dst, 8080, flow_type="L7", l7_type="REQUEST", l7_protocol="http", tcp_flags=None,
                traffic_direction="INGRESS", http_method=method, http_url=f"http://api:8080{path}")  # fmt: skip


def docs(suggestion: Suggestion) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(suggestion.stream()))


def api_paths(suggestion: Suggestion) -> list[str]:
    api = next(d for d in docs(suggestion) if d["metadata"]["name"] == "flowpipe-api")
    return sorted(p for r in api["spec"]["rules"] for t in r["to"] for p in t["operation"].get("paths", ()))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("istio-crafted")
    suggest(
        root, connection(WEB, API, 8080, 40001) + [http(WEB, API, p) for p in CRAFTED], formats=("istio",)
    )
    return root


@pytest.fixture(scope="module")
def bookinfo(hubble_captures: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("istio-bookinfo")
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id="bookinfo"))
    for batch in read_events(sorted((hubble_captures / "kind-bookinfo").glob("*.json"))):
        sink.write(batch)
    sink.close()
    return root


# -- paths ----------------------------------------------------------------------------------------------------


def test_crafted_paths_give_exact_drafts_that_istiod_accepts(crafted: Path) -> None:
    suggestion = suggest(crafted, formats=("istio",), l7=True)
    assert api_paths(suggestion) == [
        "*/static/*",  # a trailing * would be a prefix match: a suffix match, said to be wider
        "/admin",  # /a/../admin: Istio matches the normalised path
        "/api/v1/carts/{*}",  # one segment, not /api/v1/carts/* (which also allows deeper paths)
        "/details/%7Bid%7D",  # the sidecar encodes the braces; istiod refuses them raw
        "/{*}/info",  # ids in the first segment: one segment, never /*
    ]
    for doc in docs(suggestion):
        validate_authorization_policy(doc)
    result = suggestion.results[0]
    assert result.requests_proved == suggestion.requests and not result.not_allowed
    review = "\n".join(result.review)
    assert "*/static/*" in review and "wider than the traffic" in review and "carts" not in review
    assert any("/a/../admin is matched as /admin" in n for p in result.policies for n in p.comments)


def test_older_istio_gets_prefixes_said_to_be_wider_and_never_every_path(crafted: Path) -> None:
    suggestion = suggest(crafted, formats=("istio",), l7=True, istio_version="1.21")
    paths = api_paths(suggestion)
    assert "/api/v1/carts/*" in paths and {"/1/info", "/2/info"} <= set(paths)
    assert not any("{" in p for p in paths) and "/*" not in paths
    assert any(
        r.startswith("shop/flowpipe-api: GET on port 8080: /api/v1/carts/*")
        for r in suggestion.results[0].review
    )
    assert "wider than the traffic" in suggestion.stream()  # in the file header too
    for doc in docs(suggestion):
        validate_authorization_policy(doc)


def test_replay_matches_paths_as_the_sidecar_does(crafted: Path) -> None:
    suggestion = suggest(crafted, formats=("istio",), l7=True)
    policies = [p for p in suggestion.results[0].policies if isinstance(p, IstioPolicy)]

    def refused(path: str, version: str = "1.22") -> bool:
        row = {"source_namespace": "shop", "source_labels": WEB["labels"], "destination_namespace": "shop",
               "destination_labels": API["labels"], "l4_protocol": "TCP", "destination_port": 8080,
               "l7_protocol": "http", "http_method": "GET", "http_path": path}  # fmt: skip
        return bool(unallowed_requests(policies, [row], istio_version=version))

    assert not refused("/x/./../admin") and not refused("/%61dmin") and not refused("/admin?debug=1")
    assert not refused("/api/v1/carts/77") and not refused("/details/%7bid%7D".replace("%7b", "{"))
    assert refused("/api/v1/carts/1/anything/deeper") and refused("/api/v1/carts/")
    assert refused("/admin%2F") and refused("/static/x") and refused("/admin%00")
    # before 1.22, {*} is a literal: no request path holds a raw brace, so the template matches nothing
    assert refused("/api/v1/carts/77", version="1.21")


def test_a_policy_istiod_refuses_is_never_applied() -> None:
    # the draft of the past: the path copied as it was seen; istiod refuses the policy, applies the default-deny
    allow = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": "flowpipe-api", "namespace": "shop"},
             "spec": {"selector": {"matchLabels": {"app": "api"}}, "action": "ALLOW",
                      "rules": [{"to": [{"operation": {"paths": ["/details/{id}"]}}]}]}}  # fmt: skip
    deny = {**allow, "metadata": {"name": "deny", "namespace": "shop"}, "spec": {}}
    policies = [IstioPolicy("flowpipe-api", "shop", allow), IstioPolicy("deny", "shop", deny)]
    row = {"source_namespace": "shop", "source_labels": WEB["labels"], "destination_namespace": "shop",
           "destination_labels": API["labels"], "l4_protocol": "TCP", "destination_port": 8080}  # fmt: skip
    assert unallowed_requests(policies, [row]) == [row]
    assert unallowed_requests(policies, [row], istio_version="1.21") == []  # accepted then, matched literally
    with pytest.raises(AuthorizationPolicyError, match="beyond a supported path template"):
        validate_authorization_policy(allow)


@pytest.mark.parametrize(
    ("seen", "normalised"),
    [
        ("/a/../admin", "/admin"),
        ("/a/b/../../c/./d", "/c/d"),
        ("/..", "/"),
        ("/a/..", "/"),
        ("/a/.%2e/b", "/b"),
        ("\\admin\\x", "/admin/x"),
        ("/%41%2d%7e/%2F/%2f", "/A-~/%2F/%2f"),
        ("/a//b", "/a//b"),
        ("/s p/{x}|", "/s%20p/%7Bx%7D%7C"),
        ("/café", "/caf%C3%A9"),
        ("/v1/items?id=1", "/v1/items"),
        ("/a/%zz", "/a/%zz"),
        ("/a/%00", None),
    ],
)
def test_normalize_path_follows_istio_base_normalisation(seen: str, normalised: str | None) -> None:
    assert normalize_path(seen) == normalised


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/a/{*}", "/a/1", True),
        ("/a/{*}", "/a/", False),
        ("/a/{*}", "/a/1/2", False),
        ("/{*}/info", "/7/info", True),
        ("/a/{**}", "/a/1/2/3", True),
        ("/a/{**}", "/a/", True),
        ("/a/{**}/z", "/a/1/2/z", True),
        ("/a/{*}", "/a/x=y", False),
        ("/a/*", "/a/1/2", True),
        ("*/static/*", "/static/*", True),
        ("*/static/*", "/static/x", False),
        ("/a/*/b", "/a/*/b", True),
        ("/a/*/b", "/a/x/b", False),
        ("*", "/", True),
    ],
)
def test_path_matching_is_istios(pattern: str, path: str, matches: bool) -> None:
    assert path_matches(pattern, path) is matches


@pytest.mark.parametrize(
    "path",
    ["/details/{id}", "/{}", "/a/{**}/{*}", "/a/{**}x", "/a/{*}/b*", "/{*}/a b", "/a/{*}/{*}/c{"],
)
def test_istiod_path_rules_refuse_what_istiod_refuses(path: str) -> None:
    # the product's rules and the test's own reading of Istio's documentation agree
    assert istiod_refuses(path) and istiod_path_error(path)


@pytest.mark.parametrize(
    "path", ["/a/{*}", "/{*}/b/", "/a/{**}", "/a/{**}/z", "/a/*", "*/x/*", "/a/*/b", "/%7B"]
)
def test_istiod_path_rules_accept_what_istiod_accepts(path: str) -> None:
    assert istiod_refuses(path) is None and istiod_path_error(path) is None


def test_drafted_paths_never_hold_what_istiod_refuses() -> None:
    seen = ["/{a}/1", "/{a}/2", "/x=1/1", "/x=1/2", "/*/1", "/*/2", "//1", "//2", "/q/1?x", "/q/2"]
    for templates in (True, False):
        drafted = draft_paths(seen, templates=templates)
        assert all(istiod_path_error(p) is None for p in drafted.paths), drafted.paths
        assert all(any(path_matches(p, normalize_path(s) or "", templates=templates) for p in drafted.paths)
                   for s in seen)  # fmt: skip
    assert "/x=1/{*}" not in draft_paths(seen).paths  # the template matcher reads no = in a literal


# -- callers --------------------------------------------------------------------------------------------------


def test_a_caller_reported_with_a_node_address_but_its_pod_labels_is_named_by_its_labels() -> None:
    # traffic through Cilium's L7 proxy: the caller's node address, its identity and labels, no namespace
    labels = [
        "k8s:app=ratings",
        "k8s:io.kubernetes.pod.namespace=bookinfo",
        "k8s:io.cilium.k8s.policy.serviceaccount=bookinfo-ratings",
    ]
    ratings = {"source_workload": "ratings", "source_labels": labels, "source_ip": "10.244.0.148"}
    page = {"destination_namespace": "bookinfo", "destination_workload": "productpage",
            "destination_labels": ["k8s:app=productpage", "k8s:io.kubernetes.pod.namespace=bookinfo"]}  # fmt: skip
    unnamed = {"source_workload": "reviews", "source_labels": []}
    rows = [{**ratings, **page, "l4_protocol": "TCP", "destination_port": 9080, "flows": 3},
            {**unnamed, **page, "l4_protocol": "TCP", "destination_port": 9080, "flows": 2}]  # fmt: skip
    draft = draft_authorization_policies(rows)
    policy = next(p for p in draft.policies if p.name == "flowpipe-productpage")
    assert policy.document["spec"]["rules"] == [
        {"from": [{"source": {"principals": ["cluster.local/ns/bookinfo/sa/bookinfo-ratings"]}}],
         "to": [{"operation": {"ports": ["9080"]}}]}
    ]  # fmt: skip
    assert list(draft.left_out) == [1] and "namespace" in draft.left_out[1]
    assert unallowed_requests(draft.policies, rows) == [rows[1]]
    assert principal(None, labels) == "cluster.local/ns/bookinfo/sa/bookinfo-ratings"


def test_the_world_still_gets_an_open_rule_said_in_the_review(tmp_path: Path) -> None:
    rows = connection(reserved("world", "192.0.2.1"), API, 8080, 40001) + connection(WEB, API, 8080, 40002)
    suggestion = suggest(tmp_path, rows, formats=("istio",))
    assert any("accepts calls from any source" in r for r in suggestion.results[0].review)


def test_the_sidecars_own_ports_get_no_rule(tmp_path: Path) -> None:
    kubelet = reserved("host", "10.0.0.1", identity=1)
    rows = connection(kubelet, API, 15021, 40001) + connection(WEB, API, 8080, 40002)
    suggestion = suggest(tmp_path, rows, formats=("istio",))
    assert "15021" not in yaml.safe_dump(docs(suggestion))
    assert any(
        "port 15021" in n and "never reach AuthorizationPolicies" in n for n in suggestion.results[0].notes
    )


# -- the shared bookinfo capture ---------------------------------------------------------------------------


def test_bookinfo_drafts_have_no_open_rule_and_name_callers_by_service_account(bookinfo: Path) -> None:
    suggestion = suggest(bookinfo, formats=("istio",), l7=True)
    documents = docs(suggestion)
    for doc in documents:
        validate_authorization_policy(doc)
        for rule in doc["spec"].get("rules", ()):
            assert "from" in rule, f"open rule in {doc['metadata']['name']}: {rule}"
    page = next(
        d for d in documents if d["metadata"] == {"name": "flowpipe-productpage", "namespace": "bookinfo"}
    )
    callers = {p for r in page["spec"]["rules"] for f in r["from"] for p in f["source"].get("principals", ())}
    assert callers == {"cluster.local/ns/bookinfo/sa/bookinfo-ratings"}
    result = suggestion.results[0]
    assert not result.review and not result.not_allowed and result.requests_proved == suggestion.requests
    summary = "\n".join(suggestion.summary())
    for assumed in (
        "kubelet probes",
        "15020",
        "Prometheus outside the mesh",
        "ingress controller without a sidecar",
    ):
        assert assumed in summary


# -- schema ---------------------------------------------------------------------------------------------------


def test_every_istio_draft_validates_against_istios_crd_schema_and_istiod(
    istio_schemas: Path, crafted: Path, bookinfo: Path, sim_faults: Any
) -> None:
    schema = istio_schema(istio_schemas)
    drafts = [
        suggest(crafted, formats=("istio",), l7=True),
        suggest(crafted, formats=("istio",), l7=True, istio_version="1.20"),
        suggest(bookinfo, formats=("istio",), l7=True, include_kube_system=True),
        suggest(sim_faults.root, formats=("istio",), l7=True),
    ]
    count = 0
    for suggestion in drafts:
        for doc in docs(suggestion):
            jsonschema.Draft202012Validator(schema).validate(doc)
            validate_authorization_policy(doc)
            count += 1
    assert count > 10


def test_the_schema_checks_can_fail(istio_schemas: Path) -> None:
    schema = istio_schema(istio_schemas)
    good = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "x", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}}  # fmt: skip
    jsonschema.Draft202012Validator(schema).validate(good)
    unknown = {**good, "spec": {**good["spec"], "rules": [{"to": [{"operation": {"port": ["80"]}}]}]}}
    bad_action = {**good, "spec": {**good["spec"], "action": "PERMIT"}}
    for doc in (unknown, bad_action):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft202012Validator(schema).validate(doc)
    both = {**good, "spec": {**good["spec"], "rules": [
        {"from": [{"source": {"serviceAccounts": ["shop/web"], "principals": ["cluster.local/ns/shop/sa/web"]}}]}]}}  # fmt: skip
    with pytest.raises(AuthorizationPolicyError, match="serviceAccounts"):
        validate_authorization_policy(both)


def test_istio_version_must_be_a_release() -> None:
    with pytest.raises(ConfigError, match="--istio-version"):
        SuggestConfig(formats=("istio",), istio_version="latest")
    assert SuggestConfig(formats=("istio",), istio_version="v1.21.4").istio_version == "v1.21.4"


def test_the_cli_drafts_for_the_istio_version_asked(crafted: Path) -> None:
    from click.testing import CliRunner

    from flowpipe.cli import cli

    window = ["--since", "2000-01-01", "--until", "2100-01-01", "--dataset", str(crafted)]
    old = CliRunner().invoke(
        cli, ["suggest", "--format", "istio", "--l7", "--istio-version", "1.21", *window]
    )
    assert old.exit_code == 0, old.output
    paths = [p for d in yaml.safe_load_all(old.stdout) for r in d["spec"].get("rules", ())
             for t in r["to"] for p in t["operation"].get("paths", ())]  # fmt: skip
    assert "/api/v1/carts/*" in paths and not any("{" in p for p in paths)
    assert "wider than the traffic" in old.stderr and "kubelet probes" in old.stderr
    bad = CliRunner().invoke(cli, ["suggest", "--format", "istio", "--istio-version", "newest", *window])
    assert bad.exit_code == 2 and "--istio-version 'newest'" in bad.output and "Traceback" not in bad.output


def test_the_summary_names_callers_and_workloads_without_a_sidecar(tmp_path: Path) -> None:
    web, api = (
        {**end, "labels": [*end["labels"], "k8s:security.istio.io/tlsMode=istio"]} for end in (WEB, API)
    )
    prometheus = pod("monitoring", "prometheus")
    rows = connection(web, api, 8080, 40001) + connection(prometheus, api, 9090, 40002)
    notes = "\n".join(suggest(tmp_path, rows, formats=("istio",)).results[0].notes)
    assert "callers without Istio's sidecar label (security.istio.io/tlsMode=istio) in the flows: " in notes
    assert (
        "monitoring/prometheus: without a sidecar they have no principal" in notes and "shop/web" not in notes
    )
    assert "workloads without Istio's sidecar label" not in notes
