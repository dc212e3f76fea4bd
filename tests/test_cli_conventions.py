"""The command line as people and scripts meet it: a fast start that imports no data library, hubble's
spellings beside flowpipe's, repeatable filters, JSON Lines and output without padding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from support.flowdata import synthetic_flows, write_dataset

from flowpipe.bench.startup import HEAVY_MODULES, LIGHT_COMMANDS, imported_heavy_modules
from flowpipe.cli import cli
from flowpipe.cli._commands import COMMANDS

WINDOW = ["--since", "2024-01-01", "--until", "2025-01-01"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("conventions") / "data"
    write_dataset(root, synthetic_flows(200))
    return str(root)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def ok(*args: str, **kwargs: Any) -> Result:
    result = invoke(*args, **kwargs)
    assert result.exit_code == 0, result.output
    return result


# -- start-up ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", LIGHT_COMMANDS, ids=" ".join)
def test_light_commands_import_no_data_library(args: tuple[str, ...]) -> None:
    assert imported_heavy_modules(args) == []


def test_importing_flowpipe_and_its_cli_loads_no_data_library() -> None:
    probe = (
        "import sys, flowpipe, flowpipe.cli, flowpipe.query; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY_MODULES)!r}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stderr


def test_the_probe_sees_a_command_that_does_import_them() -> None:
    # the check above could not fail if the probe saw nothing: `schema` needs pyarrow and DuckDB
    assert {"pyarrow", "duckdb"} <= set(imported_heavy_modules(("schema", "--format", "json")))


def test_every_command_loads_under_its_name_with_its_short_help() -> None:
    assert set(cli.commands) == set(COMMANDS)
    for name, spec in COMMANDS.items():
        command = cli.commands[name]
        assert command.name == name
        assert command.get_short_help_str(limit=200) == spec.short_help
    listing = ok("--help", env={"COLUMNS": "200"}).stdout
    assert all(f"{name} " in listing and spec.short_help in listing for name, spec in COMMANDS.items())


def test_an_unknown_command_is_a_usage_error() -> None:
    result = invoke("qurey")
    assert result.exit_code == 2 and "No such command 'qurey'" in result.output


# -- repeatable filters and hubble's spellings ------------------------------------------------------------------


def test_namespace_given_twice_to_a_question_is_an_error_not_the_last_one(dataset: str) -> None:
    result = invoke("query", "top_talkers", "--dataset", dataset, *WINDOW, "-n", "billing", "-n", "shop")
    assert result.exit_code == 2
    assert "given 2 times (billing, shop); --namespace takes one value" in result.output


@pytest.mark.parametrize("command", ["suggest", "replay"])
def test_a_filter_that_takes_one_value_refuses_two(command: str, dataset: str) -> None:
    result = invoke(command, "--dataset", dataset, "--cluster", "a", "--cluster", "b")
    assert result.exit_code == 2 and "given 2 times (a, b); --cluster takes one value" in result.output


def test_short_namespace_output_and_last(dataset: str) -> None:
    out = ok(
        "query", "top_talkers", "--dataset", dataset, *WINDOW, "-n", "billing", "--last", "2", "-o", "json"
    )
    records = json.loads(out.stdout)
    assert 0 < len(records) <= 2
    assert all("billing" in (r["source_namespace"], r["destination_namespace"]) for r in records)
    clash = invoke("query", "top_talkers", "--dataset", dataset, "--last", "2", "-p", "limit=3")
    assert clash.exit_code == 2 and "--last and -p limit=... both set limit" in clash.output


def test_verdict_filters_the_questions_that_take_it(dataset: str, sim_faults: Any) -> None:
    simulated = ["--dataset", str(sim_faults.root), "--since", "2000-01-01", "--until", "2100-01-01"]
    every = json.loads(ok("query", "policy_verdicts", *simulated, "-o", "json").stdout)
    assert {r["verdict"] for r in every} >= {"FORWARDED", "DROPPED"}
    dropped = json.loads(
        ok("query", "policy_verdicts", *simulated, "--verdict", "dropped", "-o", "json").stdout
    )
    assert dropped and {r["verdict"] for r in dropped} == {"DROPPED"}
    assert sum(r["flows"] for r in dropped) == sum(r["flows"] for r in every if r["verdict"] == "DROPPED")
    other = invoke("query", "top_talkers", "--dataset", dataset, *WINDOW, "--verdict", "DROPPED")
    assert other.exit_code == 1 and "question top_talkers has no parameter verdict" in other.output


def test_jsonl_is_one_object_a_line(dataset: str) -> None:
    out = ok("query", "top_talkers", "--dataset", dataset, *WINDOW, "--output", "jsonl").stdout
    lines = out.splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    assert [json.loads(line) for line in lines] == json.loads(
        ok("query", "top_talkers", "--dataset", dataset, *WINDOW, "--format", "json").stdout
    )
    listed = [json.loads(line) for line in ok("query", "--list", "-o", "jsonl").stdout.splitlines()]
    assert "unexpected_drops" in {q["name"] for q in listed}
    assert all(isinstance(q["parameters"], list) for q in listed)


def test_expanded_table_lines_carry_no_padding(dataset: str) -> None:
    long_value = "x" * 500
    sql = f"SELECT '{long_value}' AS why, " + ", ".join(f"'value {i}' AS column_{i}" for i in range(20))
    out = ok("sql", sql, "--dataset", dataset).stdout  # not a terminal: a 200-column page
    lines = out.splitlines()
    assert "-[ row 1 ]" + "-" * 20 in lines
    assert [line for line in lines if line != line.rstrip()] == []
    assert (
        "".join(line.strip().removeprefix("why").strip() for line in lines if "x" * 10 in line) == long_value
    )
    assert len(out) < 2 * (len(long_value) + 20 * 30)


def test_the_shipped_question_files_are_found_from_a_checkout(tmp_path: Path) -> None:
    # `query --list` from another working directory still lists the shipped questions
    done = subprocess.run(
        [sys.executable, "-m", "flowpipe", "query", "--list", "-o", "jsonl"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"},
    )
    assert "dns_failures" in done.stdout


# -- exit codes that CI can tell apart ---------------------------------------------------------------------------


def test_audit_exit_codes_tell_findings_from_invalid_input(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "allow.yaml").write_text(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-web, namespace: shop}\n"
        "spec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n  ingress: [{}]\n"
    )
    empty = tmp_path / "empty-dataset"
    findings = invoke("audit", str(policies), "--dataset", str(empty), "--fail-on", "low", "-o", "jsonl")
    assert findings.exit_code == 1
    assert [json.loads(line)["severity"] for line in findings.stdout.splitlines()]
    (tmp_path / "broken.yaml").write_text("kind: [unclosed\n")
    broken = invoke("audit", str(tmp_path / "broken.yaml"), "--dataset", str(empty))
    assert broken.exit_code == 2 and "broken.yaml" in broken.output
    missing = invoke("audit", str(tmp_path / "nowhere"), "--dataset", str(empty))
    assert missing.exit_code == 2 and "nowhere" in missing.output
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    assert invoke("audit", str(nothing), "--dataset", str(empty)).exit_code == 2


def test_simulate_takes_durations_as_since_does() -> None:
    week = invoke("simulate", "--duration", "1w", "--rate", "0.001", "--no-faults", "-o", "-")
    assert week.exit_code == 0, week.output
    bad = invoke("simulate", "--duration", "1y", "-o", "-")
    assert bad.exit_code == 2 and "invalid duration '1y'" in bad.output


def test_suggest_policy_format_and_its_older_spelling_agree(sim_faults: Any) -> None:
    args = ["suggest", "--dataset", str(sim_faults.root), "--since", "2000-01-01", "-n", "staging"]
    new = ok(*args, "--policy-format", "kubernetes").stdout
    old = ok(*args, "--format", "kubernetes").stdout
    assert new == old and "kind: NetworkPolicy" in new and "CiliumNetworkPolicy" not in new


# -- collect: hubble's flags -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("hubble-relay", "hubble-relay:4245"),
        ("127.0.0.1", "127.0.0.1:4245"),
        ("[::1]", "[::1]:4245"),
        ("hubble-relay.kube-system.svc:80", "hubble-relay.kube-system.svc:80"),
        ("[::1]:4245", "[::1]:4245"),
    ],
)
def test_a_relay_address_without_a_port_takes_hubbles_default(given: str, used: str) -> None:
    from flowpipe.sources.relay._address import split_address, with_default_port

    assert with_default_port(given) == used
    split_address(with_default_port(given))  # a valid HOST:PORT


def test_collect_takes_hubbles_spellings(tmp_path: Path) -> None:
    collect = cli.commands["collect"]
    names = {opt: param.name for param in collect.params for opt in getattr(param, "opts", [])}
    for hubble, ours in [
        ("--server", "--relay"),
        ("--tls-ca-cert-files", "--tls-ca"),
        ("--tls-client-cert-file", "--tls-cert"),
        ("--tls-client-key-file", "--tls-key"),
        ("--node-name", "--node"),
        ("-n", "--namespace"),
    ]:
        assert names[hubble] == names[ours], hubble
    # the aliases reach the same checks: a client certificate without its key is refused before connecting
    cert = tmp_path / "client.crt"
    cert.write_text("not used")
    args = ["--server", "127.0.0.1", "--tls-client-cert-file", str(cert), "--dataset", str(tmp_path / "d")]
    result = invoke("collect", *args, "--metrics-address", "off")
    assert result.exit_code == 2 and "--tls-cert and --tls-key go together" in result.output
