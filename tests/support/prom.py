"""Test helper: a real Prometheus server on 127.0.0.1 with a generated config, queried through its HTTP API.

>>> with run_prometheus(tmp_path, targets=["127.0.0.1:9966"]) as prom:
...     prom.wait_for_series('flowpipe_build_info')
...     prom.query('sum(flowpipe_flows_received_total)')
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

from flowpipe.metrics.families import Role, series_names
from support.env import require_binary
from support.wait import WAIT_SECONDS, wait_until

T = TypeVar("T")

STARTUP_TIMEOUT_SECONDS = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of a GET (error statuses returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


class PrometheusServer:
    """A running Prometheus; `query()` runs PromQL through `/api/v1/query`."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def log_tail(self, lines: int = 30) -> str:
        """The end of Prometheus's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def api(self, path: str, **params: str) -> Any:
        """GET an API path; returns `data`, raises AssertionError with Prometheus's error otherwise."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        status, body = http_get(url, timeout=10)
        payload = json.loads(body or b"{}")
        if status != 200 or payload.get("status") != "success":
            raise AssertionError(
                f"Prometheus {path} {params}: HTTP {status}: {payload.get('error', body[:300])}"
            )
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (or a scalar wrapped as one sample)."""
        data = self.api("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def values(self, expr: str, label: str | None = None) -> dict[Any, float]:
        """Instant query as {label value (or tuple of all labels): float value}."""
        out: dict[Any, float] = {}
        for sample in self.query(expr):
            key = sample["metric"].get(label, "") if label else tuple(sorted(sample["metric"].items()))
            out[key] = float(sample["value"][1])
        return out

    def targets_up(self) -> list[dict[str, Any]]:
        """Active targets whose last scrape succeeded."""
        data = self.api("/api/v1/targets", state="active")
        return [t for t in data["activeTargets"] if t.get("health") == "up"]

    def wait_for_series(self, expr: str, *, timeout: float = WAIT_SECONDS) -> list[dict[str, Any]]:
        """Wait until `expr` returns at least one sample."""
        return wait_until(lambda: self.query(expr), timeout=timeout, what=f"data for {expr}")

    def stop(self) -> None:
        """Terminate Prometheus and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def write_config(
    path: Path, targets: Sequence[str], *, job: str = "flowpipe", scrape_interval: str = "1s"
) -> None:
    """A Prometheus config scraping `targets` (host:port) every `scrape_interval`, written with PyYAML."""
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "evaluation_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
        },
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": list(targets)}]}
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@contextmanager
def run_prometheus(
    workdir: Path, targets: Sequence[str], *, job: str = "flowpipe", scrape_interval: str = "1s"
) -> Iterator[PrometheusServer]:
    """Start Prometheus on a free 127.0.0.1 port scraping `targets`; stop it on exit. Skips without the binary."""
    binary = require_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    write_config(config, targets, job=job, scrape_interval=scrape_interval)
    server: PrometheusServer | None = None
    for _attempt in range(3):  # another process may take the free port before Prometheus binds it
        port = free_port()
        log_path = workdir / f"prometheus-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        candidate = PrometheusServer(process, port, log_path)
        if _wait_ready(candidate):
            server = candidate
            break
        candidate.stop()
    if server is None:
        raise AssertionError(f"Prometheus did not become ready; its log:\n{candidate.log_tail()}")
    try:
        yield server
    finally:
        server.stop()


def _wait_ready(server: PrometheusServer) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            status, _ = http_get(f"{server.url}/-/ready", timeout=2)
        except OSError:
            status = 0
        if status == 200:
            return True
        time.sleep(0.2)
    return False


# -- dashboards and PromQL -------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = ROOT / "docker" / "grafana" / "dashboards"

GRAFANA_VARIABLES = {
    "$__rate_interval": "30s",
    "${__rate_interval}": "30s",
    "$__interval": "5s",
    "$__range": "10m",
    "${__range}": "10m",
    "$namespace": ".*",
    "${namespace}": ".*",
    "$cluster": ".*",
    "${cluster}": ".*",
}
"""What Grafana would put in place of its variables, for running a panel's PromQL against Prometheus directly."""

PROMQL_WORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "and",
        "or",
        "unless",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ]
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_BLOCK = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w$.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w(])(?!\s*\()")
_VARIABLE = re.compile(r"\$\{?\w+\}?")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and variables left out)."""
    text = _VARIABLE.sub("", _STRING.sub('""', expr))
    text = _GROUPING.sub(" ", _RANGE.sub("", _LABEL_BLOCK.sub("", text)))
    text = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?\b", " ", text)
    return {name for name in _IDENTIFIER.findall(text) if name not in PROMQL_WORDS}


def substitute_grafana_variables(expr: str) -> str:
    """A panel expression with Grafana's variables replaced, runnable by Prometheus."""
    for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
    return expr


def load_dashboards() -> dict[str, dict[str, Any]]:
    """Every shipped dashboard, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) for every panel target of every shipped dashboard."""
    out = []
    for name, dashboard in load_dashboards().items():
        for panel in dashboard_panels(dashboard):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((name, panel["title"], target["expr"]))
    return out


# -- dashboards against a running flowpipe -------------------------------------------------------------------

QUESTION_METRICS = frozenset(
    {
        "flowpipe_unexpected_drops",
        "flowpipe_expected_drops",
        "flowpipe_dns_lookups",
        "flowpipe_dns_failed_lookups",
        "flowpipe_question_runs_total",
    }
)
"""Filled only when the question catalog has `unexpected_drops` (and `dns_failures`)."""


def question_available() -> bool:
    try:
        from flowpipe.query.catalog import load_questions
    except ImportError:
        return False
    return "unexpected_drops" in load_questions()


def deferred_to_collect() -> list[tuple[str, str, str]]:
    """Dashboard queries that need metrics only `flowpipe collect` exports."""
    dataset_names = series_names(role="dataset")
    return [w for w in dashboard_expressions() if not promql_metric_names(w[2]) <= dataset_names]


def check_dashboard_queries(prom: PrometheusServer, *, role: Role, with_question: bool) -> list[str]:
    """Run every dashboard query that the role can fill through Prometheus; each must return data.

    Returns the queries left out (other role, or the question missing) so the caller can report them.
    """
    names = series_names(role=role)
    left_out = []
    for dashboard, title, expr in dashboard_expressions():
        used = promql_metric_names(expr)
        if not used <= names or (used & QUESTION_METRICS and not with_question):
            left_out.append(f"{dashboard}: {title}: {expr}")
            continue
        query = substitute_grafana_variables(expr)
        wait_until(lambda q=query: prom.query(q), what=f"data for {dashboard} / {title}: {query}")
    return left_out
