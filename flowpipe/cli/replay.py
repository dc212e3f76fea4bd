"""`flowpipe replay`: evaluate stored flows against policy files: what they would deny, what each rule matches."""

from __future__ import annotations

import json

import click
import pyarrow as pa

from flowpipe.app.replay import replay_stored_flows
from flowpipe.cli._options import dataset_option, format_option, one_value
from flowpipe.cli._output import format_datetime, render
from flowpipe.cli._review import (
    FINDINGS_EXIT_CODE,
    load_policy_input,
    report_file_options,
    sarif_text,
    write_report,
)
from flowpipe.config import field_defaults, field_help
from flowpipe.policy.delta import DeltaEdge, DeltaReport
from flowpipe.policy.replay import ReplayConfig, ReplayReport
from flowpipe.policy.review import delta_junit, delta_sarif, junit_text

_HELP = field_help(ReplayConfig)
_DEFAULT = field_defaults(ReplayConfig)


def _help(name: str) -> str:
    return _HELP[name]


@click.command("replay")
@click.argument("paths", nargs=-1, required=True, metavar="POLICY_FILE_OR_DIR...")
@click.option(
    "--since", help="Window start: 1h, 30m, 7d, an ISO timestamp, or `all` (the default: every stored flow)."
)
@click.option("--until", help="Window end, same forms as --since (default: the newest flow).")
@click.option(
    "--cluster",
    metavar="NAME",
    multiple=True,
    callback=one_value,
    help="Replay the flows of this cluster (cluster_name); needed when the window holds several.",
)
@click.option(
    "--allow-localhost/--no-allow-localhost",
    default=_DEFAULT["allow_localhost"],
    show_default=True,
    help=_help("allow_localhost"),
)
@click.option("--cidr-match-nodes", is_flag=True, help=_help("cidr_match_nodes"))
@click.option(
    "--baseline",
    "baseline_paths",
    multiple=True,
    metavar="POLICY_FILE_OR_DIR",
    help="The policies in force today (repeat for several paths): report what the change does to each edge.",
)
@click.option(
    "--fail-on-break",
    is_flag=True,
    help="Exit with status 1 when some request that gets through would be denied.",
)
@click.option(
    "--fail-on-allow",
    is_flag=True,
    help="Exit with status 1 when some request denied today would be allowed.",
)
@report_file_options
@dataset_option
@format_option("table", "json")
def replay(
    paths: tuple[str, ...],
    since: str | None,
    until: str | None,
    cluster: str | None,
    allow_localhost: bool,
    cidr_match_nodes: bool,
    baseline_paths: tuple[str, ...],
    fail_on_break: bool,
    fail_on_allow: bool,
    sarif_path: str | None,
    junit_path: str | None,
    dataset: str,
    output_format: str,
) -> None:
    """Replay the stored flows through Kubernetes and Cilium policy files.

    Reports the requests the policies would deny (grouped by edge), how many flows each rule matches, and the
    rules that match nothing. Nothing is applied to a cluster. Policies apply to one cluster: when the dataset
    holds flows of several clusters, choose one with --cluster.

    With --baseline (the policies in force today), both sets are judged on the same edges and the report is the
    difference: requests that would newly be denied (the breaks), requests denied today that would be allowed,
    rules added, removed and changed with the requests they match, and the unchanged totals.

    Exit status: 0; 1 with --fail-on-break when some request would newly be denied, or with --fail-on-allow
    when some would newly be allowed (without --baseline: against the recorded verdicts); 2 the policy input
    is invalid.

    \b
    Examples:
      flowpipe replay policies/ --since 7d
      flowpipe replay policies/ --cluster eu-1
      flowpipe replay drafts/shop.yaml --format json | jq .would_break
      flowpipe replay proposed/ --baseline current/ --fail-on-break --sarif replay.sarif
    """
    policies = load_policy_input(paths)
    baseline = load_policy_input(baseline_paths, what="baseline policies") if baseline_paths else None
    gating = baseline is not None or fail_on_break or fail_on_allow or bool(sarif_path) or bool(junit_path)
    outcome = replay_stored_flows(
        dataset,
        policies,
        baseline,
        since=since,
        until=until,
        cluster=cluster,
        config=ReplayConfig(allow_localhost=allow_localhost, cidr_match_nodes=cidr_match_nodes),
        judge_delta=gating,
    )
    if outcome.anchor is not None:
        click.echo(
            f"note: --since counts back from the newest flow ({format_datetime(outcome.anchor)}), not the clock",
            err=True,
        )
    delta = outcome.delta
    if baseline is not None and delta is not None:
        if output_format == "json":
            click.echo(json.dumps(delta.to_dict(), indent=2, ensure_ascii=False))
        else:
            print_delta(delta)
    else:
        report = outcome.report
        assert report is not None
        if output_format == "json":
            click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        else:
            print_report(report)
    if delta is None:
        return
    write_report(sarif_path, sarif_text(delta_sarif(delta)))
    write_report(junit_path, junit_text(delta_junit(delta, fail_on_allow=fail_on_allow)))
    failing = []
    if fail_on_break and delta.newly_denied:
        failing.append(f"{delta.newly_denied_requests} request(s) would newly be denied")
    if fail_on_allow and delta.newly_allowed:
        failing.append(f"{delta.newly_allowed_requests} request(s) would newly be allowed")
    if failing:
        click.echo("; ".join(failing), err=True)
        raise click.exceptions.Exit(FINDINGS_EXIT_CODE)


def _edge_table(edges: list[DeltaEdge], title: str) -> None:
    if not edges:
        return
    table = pa.Table.from_pylist(
        [
            {
                "source": e.source,
                "destination": e.destination,
                "port": f"{e.protocol or '?'}/{e.port if e.port is not None else '*'}",
                "l7": e.l7,
                "where": e.direction,
                "requests": e.flows,
                "forwarded": e.forwarded,
                "dropped": e.dropped,
                "why": e.reason,
            }
            for e in edges
        ]
    )
    render(table, "table", title=title)


def print_delta(delta: DeltaReport) -> None:
    """The difference for people: the breaks, the new allowances, the rule changes, and the summary line."""
    _edge_table(delta.newly_denied, "newly denied: requests that get through today and would be denied")
    _edge_table(delta.newly_allowed, "newly allowed: requests denied today that would be allowed")
    if delta.rules:
        rules = pa.Table.from_pylist(
            [
                {
                    "change": r.change,
                    "policy": r.policy,
                    "rule": r.rule,
                    "action": r.action,
                    "matched before": r.matched_before,
                    "matched after": r.matched_after,
                }
                for r in delta.rules
            ]
        )
        render(rules, "table", title="rules added, removed and changed")
    for warning in delta.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(delta.summary())


def print_report(report: ReplayReport) -> None:
    """The report for people: denied edges, rules with their matches, and the summary line."""
    if report.denied_edges:
        edges = pa.Table.from_pylist(
            [
                {
                    "source": e.source,
                    "destination": e.destination,
                    "port": f"{e.protocol or '?'}/{e.port if e.port is not None else '*'}",
                    "l7": e.l7,
                    "where": e.direction,
                    "flows": e.flows,
                    "forwarded": e.forwarded,
                    "dropped": e.dropped,
                    "why": e.reason,
                }
                for e in report.denied_edges
            ]
        )
        render(edges, "table", title="requests the policies would deny")
    rules = pa.Table.from_pylist(
        [
            {"policy": r.policy, "rule": r.rule, "action": r.action, "matched_flows": r.matched_flows}
            for r in report.rules
        ],
        schema=pa.schema(
            [
                ("policy", pa.string()),
                ("rule", pa.string()),
                ("action", pa.string()),
                ("matched_flows", pa.int64()),
            ]
        ),
    )
    render(rules, "table", title="flows matched by each rule")
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(report.summary())
