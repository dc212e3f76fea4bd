"""docker/: the deployment assets are valid and consistent with each other and with flowpipe's metrics.

The image, the Kubernetes manifests, the Prometheus configs and the Grafana dashboards.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from support.env import require_binary
from support.prom import (
    DASHBOARD_DIR,
    ROOT,
    dashboard_expressions,
    dashboard_panels,
    load_dashboards,
    promql_metric_names,
)

from flowpipe.metrics.families import METRICS, series_names

DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"
KUBERNETES_VERSION = "1.33.0"
"""The Kubernetes version the manifests are validated against (kubernetes-validate's bundled schemas)."""
CUSTOM_RESOURCES = {
    ("cilium.io/v2", "CiliumNetworkPolicy"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
OPTIONAL = {"servicemonitor.yaml", "prometheusrule.yaml"}
"""Manifests for the Prometheus Operator, applied on their own (they need its CRDs)."""
METRICS_PORT = 9966
POD_LABELS = {"app.kubernetes.io/name": "flowpipe", "app.kubernetes.io/component": "collector"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) → document, for every Kubernetes object of docker/k8s/base and docker/k8s (the optional
    Prometheus Operator ones), kustomizations excluded."""
    out = {}
    for path in sorted([*BASE.glob("*.yaml"), *K8S.glob("*.yaml")]):
        for doc in documents(path):
            if doc["kind"] != "Kustomization":
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def deployment() -> dict[str, Any]:
    return manifests()[("Deployment", "flowpipe")]


def container() -> dict[str, Any]:
    (only,) = deployment()["spec"]["template"]["spec"]["containers"]
    return only


# -- Dockerfile -------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerfile_bases() -> list[str]:
    """The base image of each stage, with the `ARG` defaults put in place of their variables."""
    instructions = dockerfile_instructions()
    defaults = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)
    bases = []
    for op, arg in instructions:
        if op == "FROM":
            image = arg.split()[0]
            for name, value in defaults.items():
                image = image.replace("${" + name + "}", value)
            bases.append(image)
    return bases


def test_dockerfile_slim_base_non_root_entrypoint_and_healthcheck() -> None:
    instructions = dockerfile_instructions()
    bases = dockerfile_bases()
    assert bases and all(re.match(r"python:3\.1[1-9]-slim\b", base) for base in bases)
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    users = [arg for op, arg in final_stage if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0].isdigit()  # numeric, so runAsNonRoot can verify it
    assert json.loads(dict(final_stage)["ENTRYPOINT"]) == ["flowpipe"]
    healthcheck = dict(final_stage)["HEALTHCHECK"]
    assert "/healthz" in healthcheck and "CMD" in healthcheck
    assert str(METRICS_PORT) in dict(final_stage)["EXPOSE"]


def test_dockerfile_one_base_pinned_deps_and_compiled_bytecode() -> None:
    bases = set(dockerfile_bases())
    assert len(bases) == 1  # both stages on the same base (a digest given once applies to both)
    assert re.fullmatch(r"python:3\.1[1-9]-slim@sha256:[0-9a-f]{64}", bases.pop())  # pinned by digest
    runs = [arg for op, arg in dockerfile_instructions() if op == "RUN"]
    assert any("pip wheel" in run and "--constraint" in run for run in runs)
    (install,) = [run for run in runs if "pip install" in run]
    assert "--constraint" in install and "--no-index" in install and "--no-compile" not in install
    assert "compileall" in install  # the root filesystem is read-only: bytecode is compiled into the image
    assert "!docker/constraints.txt" in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()


def test_constraints_pin_every_runtime_dependency_within_its_range() -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in docker/constraints.txt"
        assert requirement.specifier.contains(pins[name]), (name, pins[name], str(requirement.specifier))
    assert "pandas" not in pins  # the image does not need it


def test_package_metadata_version_in_one_place_typed_and_classified() -> None:
    import flowpipe

    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert pyproject["tool"]["hatch"]["version"]["path"] == "flowpipe/__init__.py"
    assert re.fullmatch(r"\d+\.\d+\.\d+", flowpipe.__version__)
    assert (ROOT / "flowpipe" / "py.typed").is_file()
    assert "Typing :: Typed" in project["classifiers"]
    names = {requirement_name(d) for d in project["dependencies"]}
    assert "pandas" not in names and "boto3" not in names
    assert "s3" not in project["optional-dependencies"]  # nothing imports boto3: object storage is pyarrow's
    for extra in ("pandas", "bench", "spark"):
        assert "pandas" in {requirement_name(d) for d in project["optional-dependencies"][extra]}


def requirement_name(text: str) -> str:
    return re.split(r"[<>=!~\[; ]", text, maxsplit=1)[0].lower()


def test_dockerfile_copies_only_what_exists() -> None:
    for op, arg in dockerfile_instructions():
        if op == "COPY" and "--from" not in arg:
            *sources, _ = arg.split()
            for source in sources:
                assert (ROOT / source).exists(), source


# -- Kubernetes manifests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted([*BASE.glob("*.yaml"), *K8S.glob("*.yaml")]), ids=lambda p: str(p.relative_to(K8S))
)
def test_every_manifest_validates(path: Path, cilium_schemas: Path) -> None:
    docs = documents(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if doc["kind"] == "Kustomization":
            for resource in doc["resources"]:
                assert (path.parent / resource).exists(), resource
        elif key == ("cilium.io/v2", "CiliumNetworkPolicy"):
            schema = json.loads((cilium_schemas / "ciliumnetworkpolicy.v2.openapi.json").read_text())
            # Draft 7 without a metaschema check: the CRD schema holds Go regexes Python's re cannot compile.
            errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
            assert errors == []
        elif key == ("monitoring.coreos.com/v1", "ServiceMonitor"):
            check_service_monitor(doc)
        elif key == ("monitoring.coreos.com/v1", "PrometheusRule"):
            assert set(doc["spec"]) == {"groups"}  # the rules themselves: tests/test_alert_rules.py
        else:
            assert key not in CUSTOM_RESOURCES
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_optional_operator_ones() -> None:
    (kustomization,) = documents(BASE / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert kustomization["namespace"] == "kube-system"
    assert {p.name for p in K8S.glob("*.yaml")} == OPTIONAL | {"kustomization.yaml"}
    (default,) = documents(K8S / "kustomization.yaml")
    assert default["resources"] == ["overlays/plaintext"]
    for overlay in ("plaintext", "tls"):
        (kustomization,) = documents(OVERLAYS / overlay / "kustomization.yaml")
        assert kustomization["resources"] == ["../../base"]


# -- the overlays: plaintext (a default Cilium install) and TLS -------------------------------------------------


def _merge_by_name(base: list[dict[str, Any]], patch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged = {item["name"]: item for item in base}
    for item in patch:
        merged[item["name"]] = {**merged.get(item["name"], {}), **item}
    return list(merged.values())


def rendered_deployment(overlay: str) -> dict[str, Any]:
    """The Deployment an overlay applies: the base with the overlay's strategic-merge patch (args replaced,
    volumes and mounts merged by name, as kustomize does); checked against `kubectl kustomize` where kubectl is
    installed."""
    deployment_doc = json.loads(json.dumps(deployment()))
    (kustomization,) = documents(OVERLAYS / overlay / "kustomization.yaml")
    for patch in kustomization.get("patches", []):
        (doc,) = documents(OVERLAYS / overlay / patch["path"])
        pod, patch_pod = deployment_doc["spec"]["template"]["spec"], doc["spec"]["template"]["spec"]
        pod["volumes"] = _merge_by_name(pod["volumes"], patch_pod.get("volumes", []))
        (target,) = pod["containers"]
        (changes,) = patch_pod["containers"]
        for key, value in changes.items():
            target[key] = _merge_by_name(target[key], value) if key == "volumeMounts" else value
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        done = subprocess.run(
            [kubectl, "kustomize", str(OVERLAYS / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode == 0:
            (rendered,) = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "Deployment"]
            (container_doc,) = rendered["spec"]["template"]["spec"]["containers"]
            (mine,) = deployment_doc["spec"]["template"]["spec"]["containers"]
            assert container_doc["args"] == mine["args"]
            assert {v["name"] for v in rendered["spec"]["template"]["spec"]["volumes"]} == {
                v["name"] for v in deployment_doc["spec"]["template"]["spec"]["volumes"]
            }
    return deployment_doc


def overlay_flags(overlay: str) -> tuple[dict[str, str], dict[str, Any]]:
    rendered = rendered_deployment(overlay)
    (only,) = rendered["spec"]["template"]["spec"]["containers"]
    assert only["args"][0] == "collect"
    return dict(arg.split("=", 1) for arg in only["args"][1:]), rendered


def test_the_default_is_plaintext_on_port_80_as_cilium_installs_the_relay() -> None:
    flags, rendered = overlay_flags("plaintext")
    assert flags["--relay"] == "hubble-relay.kube-system.svc.cluster.local:80"
    assert not [flag for flag in flags if flag.startswith("--tls")]
    assert "relay-tls" not in {v["name"] for v in rendered["spec"]["template"]["spec"]["volumes"]}


def check_service_monitor(doc: dict[str, Any]) -> None:
    """Structure of the ServiceMonitor: it selects the metrics Service and scrapes its named port."""
    service = manifests()[("Service", "flowpipe-metrics")]
    spec = doc["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def test_everything_runs_in_the_cilium_namespace() -> None:
    assert {doc["metadata"]["namespace"] for doc in manifests().values()} == {"kube-system"}


def test_deployment_security_context() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    context = container()["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["privileged"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_deployment_resources_probes_and_volumes() -> None:
    c = container()
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": METRICS_PORT}
    assert c["livenessProbe"]["httpGet"]["port"] == c["readinessProbe"]["httpGet"]["port"] == "metrics"
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert set(volumes) == set(mounts)
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in manifests()
    assert any(m["mountPath"] == "/tmp" for m in mounts.values())  # the root filesystem is read-only


def test_the_tls_overlay_runs_collect_against_the_relay_over_tls() -> None:
    flags, rendered = overlay_flags("tls")
    (tls_container,) = rendered["spec"]["template"]["spec"]["containers"]
    assert flags["--relay"] == "hubble-relay.kube-system.svc.cluster.local:443"
    mounts = {m["name"]: m for m in tls_container["volumeMounts"]}
    tls_mount = mounts["relay-tls"]["mountPath"]
    assert mounts["relay-tls"]["readOnly"] is True
    for flag, key in (("--tls-ca", "ca.crt"), ("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
        assert flags[flag] == f"{tls_mount}/{key}"  # the key names of a kubernetes.io/tls Secret
    assert flags["--tls-server-name"].endswith(".hubble-relay.cilium.io")
    volumes = {v["name"]: v for v in rendered["spec"]["template"]["spec"]["volumes"]}
    assert volumes["relay-tls"]["secret"]["secretName"] == "hubble-relay-client-certs"
    assert set(volumes) == set(mounts)
    # everything else as in the base
    base_flags = dict(arg.split("=", 1) for arg in container()["args"][1:])
    assert {k: v for k, v in flags.items() if not k.startswith("--tls") and k != "--relay"} == {
        k: v for k, v in base_flags.items() if k != "--relay"
    }


def test_deployment_writes_the_volume_and_serves_metrics() -> None:
    flags = dict(arg.split("=", 1) for arg in container()["args"][1:])
    assert flags["--metrics-address"] == f"0.0.0.0:{METRICS_PORT}"
    assert flags["--dataset"] == next(
        m["mountPath"] for m in container()["volumeMounts"] if m["name"] == "data"
    )


def test_deployment_flags_exist_on_the_collect_command() -> None:
    from flowpipe.cli import cli

    collect = cli.commands.get("collect")
    if collect is None:
        pytest.skip("`flowpipe collect` is not part of this build yet")
    known = {opt for param in collect.params for opt in getattr(param, "opts", [])}
    for overlay in ("plaintext", "tls"):
        (only,) = rendered_deployment(overlay)["spec"]["template"]["spec"]["containers"]
        assert {arg.split("=", 1)[0] for arg in only["args"][1:]} <= known


def test_service_selects_the_pod_and_exposes_metrics() -> None:
    service = manifests()[("Service", "flowpipe-metrics")]
    assert (
        service["spec"]["selector"].items() <= deployment()["spec"]["template"]["metadata"]["labels"].items()
    )
    (port,) = service["spec"]["ports"]
    assert port["port"] == METRICS_PORT and port["targetPort"] == "metrics"
    pod_annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    for scrape in (service["metadata"]["annotations"], pod_annotations):
        assert scrape["prometheus.io/scrape"] == "true"
        assert scrape["prometheus.io/port"] == str(METRICS_PORT)
        assert scrape["prometheus.io/path"] == "/metrics"


def test_scraping_does_not_depend_on_readiness() -> None:
    # The readiness probe says "connected and writing": a collector that lost the relay is not ready, and
    # those are the metrics that show the outage. The metrics Service publishes not-ready pods, one target each.
    service = manifests()[("Service", "flowpipe-metrics")]
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["clusterIP"] == "None"  # every collector is a target, not one behind a virtual IP
    assert container()["readinessProbe"]["httpGet"]["path"] == "/readyz"
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "flowpipe"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == [f"flowpipe-metrics.{service['metadata']['namespace']}.svc.cluster.local"]
    assert sd["type"] == "A" and sd["port"] == METRICS_PORT


def test_network_policy_allows_relay_dns_and_prometheus_only() -> None:
    policy = manifests()[("NetworkPolicy", "flowpipe")]["spec"]
    assert policy["podSelector"]["matchLabels"] == POD_LABELS
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    egress = {
        (peer["podSelector"]["matchLabels"].get("k8s-app"), port["protocol"], port["port"])
        for rule in policy["egress"]
        for peer in rule["to"]
        for port in rule["ports"]
    }
    assert egress == {("hubble-relay", "TCP", 4245), ("kube-dns", "UDP", 53), ("kube-dns", "TCP", 53)}
    (ingress,) = policy["ingress"]
    assert [p["port"] for p in ingress["ports"]] == [METRICS_PORT]
    assert ingress["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "prometheus"


def test_cilium_network_policy_allows_relay_dns_and_prometheus_only() -> None:
    spec = manifests()[("CiliumNetworkPolicy", "flowpipe")]["spec"]
    assert spec["endpointSelector"]["matchLabels"] == POD_LABELS
    egress = set()
    for rule in spec["egress"]:
        (peer,) = rule["toEndpoints"]
        labels = peer["matchLabels"]
        assert labels["k8s:io.kubernetes.pod.namespace"] == "kube-system"
        for to_ports in rule["toPorts"]:
            egress |= {(labels["k8s-app"], p["protocol"], p["port"]) for p in to_ports["ports"]}
    assert egress == {("hubble-relay", "TCP", "4245"), ("kube-dns", "UDP", "53"), ("kube-dns", "TCP", "53")}
    ingress_ports = {p["port"] for rule in spec["ingress"] for tp in rule["toPorts"] for p in tp["ports"]}
    assert ingress_ports == {str(METRICS_PORT)}
    sources = [rule.get("fromEndpoints", rule.get("fromEntities")) for rule in spec["ingress"]]
    assert sources[0][0]["matchLabels"]["app.kubernetes.io/name"] == "prometheus"
    assert ["host"] in sources  # kubelet probes


# -- Prometheus config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-compose.yml"])
def test_promtool_check_config(name: str) -> None:
    promtool = require_binary("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(DOCKER / "prometheus" / name)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_scrapes_hubble_beside_flowpipe() -> None:
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"flowpipe", "hubble"} <= set(jobs)  # Hubble's own metrics beside flowpipe's


def test_compose_demo_wires_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert services["flowpipe"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / services["flowpipe"]["build"]["context"] / "pyproject.toml").is_file()
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus-compose.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"flowpipe:{METRICS_PORT}"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), source


# -- Grafana -------------------------------------------------------------------------------------------------------


def test_grafana_provisioning() -> None:
    (datasource,) = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]
    assert datasource["type"] == "prometheus"
    (provider,) = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "flowpipe.yaml").read_text()
    )["providers"]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    for dashboard in load_dashboards().values():
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["current"]["value"] == datasource["uid"]


def test_the_compose_home_dashboard_is_one_serve_metrics_fills() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert compose["services"]["flowpipe"]["command"][0] == "serve-metrics"
    dashboard = load_dashboards()[home.rsplit("/", 1)[1]]
    dataset_names = series_names(role="dataset")
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            assert promql_metric_names(target["expr"]) <= dataset_names, (panel["title"], target["expr"])


def test_the_four_dashboards_exist() -> None:
    titles = {d["title"] for d in load_dashboards().values()}
    assert titles == {
        "flowpipe / Pipeline health",
        "flowpipe / Drops",
        "flowpipe / DNS",
        "flowpipe / Policy verdicts",
    }


@pytest.mark.parametrize("path", sorted(DASHBOARD_DIR.glob("*.json")), ids=lambda p: p.name)
def test_dashboard_parses_with_unique_panel_ids(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    ids = [panel["id"] for panel in dashboard_panels(dashboard)]
    assert ids and len(ids) == len(set(ids))
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40
    for panel in dashboard_panels(dashboard):
        assert panel["title"] and panel.get("description"), panel["id"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))


def test_dashboard_uids_are_unique() -> None:
    uids = [d["uid"] for d in load_dashboards().values()]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("where", dashboard_expressions(), ids=lambda w: f"{w[0]}:{w[1]}")
def test_every_panel_query_uses_only_flowpipe_metrics(where: tuple[str, str, str]) -> None:
    _, _, expr = where
    names = promql_metric_names(expr)
    assert names, f"no metric in {expr}"
    assert names <= series_names(), names - series_names()


def test_template_variables_use_only_flowpipe_metrics() -> None:
    for dashboard in load_dashboards().values():
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                match = re.fullmatch(
                    r"label_values\((\w+)(?:\{[^}]*\})?,\s*(\w+)\)", variable["query"]["query"]
                )
                assert match, variable["query"]
                spec = next(s for s in METRICS if s.name == match[1])
                assert match[2] in spec.labels


def test_the_analytics_dashboards_choose_a_cluster() -> None:
    # one answer per cluster: every panel of the drops, DNS and policy dashboards filters on $cluster
    for name in ("drops.json", "dns.json", "policy-verdicts.json"):
        dashboard = load_dashboards()[name]
        assert [v["name"] for v in dashboard["templating"]["list"]][1:] == ["cluster", "namespace"]
        for panel in dashboard_panels(dashboard):
            for target in panel.get("targets", []):
                assert 'cluster=~"$cluster"' in target["expr"], (name, panel["title"])


def test_every_analytics_family_is_on_a_dashboard() -> None:
    used = set().union(*(promql_metric_names(expr) for _, _, expr in dashboard_expressions()))
    wanted = {s.name for s in METRICS if s.kind != "info"}
    wanted = {
        name + "_bucket" if name.endswith("_seconds") and "duration" in name else name for name in wanted
    }
    assert wanted - used == set()


def test_failed_lookup_panels_read_the_dns_failures_gauges() -> None:
    # failed lookups and their share are the dns_failures question's (a lookup across its search-path
    # expansions), never the streaming counters of error answers
    panels = [
        (title, expr)
        for _, title, expr in dashboard_expressions()
        if "failure share" in title.lower() or "failed lookups" in title.lower()
    ]
    assert {title for title, _ in panels} >= {"DNS failure share", "Failed lookups by namespace and reason"}
    for title, expr in panels:
        assert promql_metric_names(expr) <= {"flowpipe_dns_failed_lookups", "flowpipe_dns_lookups"}, title
    (share,) = [expr for title, expr in panels if title == "DNS failure share"]
    assert promql_metric_names(share) == {"flowpipe_dns_failed_lookups", "flowpipe_dns_lookups"}


def test_promql_metric_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="y{z}"}[$__rate_interval]))) '
        "/ on(job) group_left(node) b_total offset 5m or vector(0)"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total"}
