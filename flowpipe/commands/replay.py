"""`flowpipe replay`: evaluate stored flows against policy files: what they would deny, what each rule matches."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import datetime

import click
import pyarrow as pa

from flowpipe._cli_options import dataset_option, format_option, one_value
from flowpipe._output import format_datetime, render
from flowpipe.commands._review import (
    FINDINGS_EXIT_CODE,
    load_policy_input,
    report_file_options,
    sarif_text,
    write_report,
)
from flowpipe.policy.clusters import choose_cluster
from flowpipe.policy.delta import DeltaEdge, DeltaReport, delta_parameters, replay_delta
from flowpipe.policy.replay import ReplayConfig, ReplayReport, replay_edges
from flowpipe.policy.review import delta_junit, delta_sarif, junit_text
from flowpipe.policy.stored_edges import EDGES_SQL, prepare_edges
from flowpipe.query.engine import open_engine
from flowpipe.query.run import newest_flow_time, relative_anchor
from flowpipe.query.timeparse import is_relative_time, parse_duration, parse_time


def _help(name: str) -> str:
    return str(next(f for f in fields(ReplayConfig) if f.name == name).metadata["help"])


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
    "--allow-localhost/--no-allow-localhost", default=True, show_default=True, help=_help("allow_localhost")
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
    with open_engine(dataset, require_flows=True) as engine:
        newest = newest_flow_time(engine)
        start, end, anchor = resolve_window(newest, since, until)
        chosen = choose_cluster(engine, cluster or None, start, end, command="replay")
        # One grouping for both sets: it keeps what either set can tell apart.
        prepare_edges(engine)
        edges = engine.run(
            EDGES_SQL,
            delta_parameters(policies, baseline, since=start, until=end, cluster=chosen),
            question="replay edges",
        )
    if anchor is not None:
        click.echo(
            f"note: --since counts back from the newest flow ({format_datetime(anchor)}), not the clock",
            err=True,
        )
    config = ReplayConfig(allow_localhost=allow_localhost, cidr_match_nodes=cidr_match_nodes)
    rows = edges.to_pylist()
    gating = baseline is not None or fail_on_break or fail_on_allow or sarif_path or junit_path
    delta = replay_delta(policies, baseline, rows, config) if gating else None
    if baseline is not None and delta is not None:
        if output_format == "json":
            click.echo(json.dumps(delta.to_dict(), indent=2, ensure_ascii=False))
        else:
            print_delta(delta)
    else:
        report = replay_edges(policies, rows, config)
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


def resolve_window(
    newest: datetime | None, since: str | None, until: str | None, *, now: datetime | None = None
) -> tuple[datetime | None, datetime | None, datetime | None]:
    """The (since, until) bounds, and the newest flow's time when relative values count back from it.

    Relative values count back from the clock, unless the dataset is older than the window asked for: then
    from the newest flow, so that an old capture still answers.
    """
    span = parse_duration(since) if since is not None and is_relative_time(since) else None
    anchor, anchored_to = relative_anchor(newest, span, now=now)
    start = parse_time(since, anchor=anchor, name="--since") if since is not None else None
    end = parse_time(until, anchor=anchor, name="--until", end=True) if until is not None else None
    return start, end, anchor if anchored_to == "data" else None


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
