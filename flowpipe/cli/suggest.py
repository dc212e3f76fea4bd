"""`flowpipe suggest`: draft least-privilege policies from the stored flows, proved by replay before they are shown."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from flowpipe.app.suggest import EXIT_PARTIAL, FORMATS, SuggestConfig, suggest_policies, write_files
from flowpipe.cli._options import dataset_option, one_value, source_option
from flowpipe.cli._output import format_datetime
from flowpipe.config import field_defaults, field_help
from flowpipe.policy.istio import DEFAULT_ISTIO_VERSION
from flowpipe.query.engine import open_engine
from flowpipe.query.run import window_coverage

_HELP = field_help(SuggestConfig)
_DEFAULT = field_defaults(SuggestConfig)


def _help(name: str) -> str:
    return _HELP[name]


@click.command("suggest")
@click.option("--namespace", "-n", "namespaces", multiple=True, metavar="NS", help=_help("namespaces"))
@click.option("--cluster", metavar="NAME", multiple=True, callback=one_value, help=_help("cluster"))
@click.option("--since", default=_DEFAULT["since"], show_default=True, help=_help("since"))
@click.option("--until", help=_help("until"))
@click.option(
    "--policy-format",
    "--format",
    "output_format",
    type=click.Choice(list(FORMATS)),
    default="cilium",
    show_default=True,
    help="The policy flavour: CiliumNetworkPolicy, Kubernetes NetworkPolicy, both, or Istio "
    "AuthorizationPolicy (--format is the older spelling).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write one file per namespace (or workload) into this folder instead of printing them.",
)
@click.option(
    "--summary-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="The summary (the review: per namespace what was drafted, covered, left out and kept denied) as text "
    "on stderr, or as JSON: on stdout with --out, else on stderr.",
)
@click.option("--l7", is_flag=True, help=_help("l7"))
@click.option("--learn-from-drops", is_flag=True, help=_help("learn_from_drops"))
@click.option("--per-workload", is_flag=True, help=_help("per_workload"))
@click.option("--include-kube-system", is_flag=True, help=_help("include_kube_system"))
@click.option(
    "--existing",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    metavar="DIR",
    help=_help("existing") + " Prints only the additional policies.",
)
@click.option("--verify-flows/--no-verify-flows", default=True, show_default=True, help=_help("verify_flows"))
@click.option(
    "--istio-version",
    default=DEFAULT_ISTIO_VERSION,
    show_default=True,
    metavar="X.Y",
    help=_help("istio_version"),
)
@dataset_option
@source_option
def suggest(
    namespaces: tuple[str, ...],
    cluster: str | None,
    since: str,
    until: str | None,
    output_format: str,
    out: Path | None,
    summary_format: str,
    l7: bool,
    learn_from_drops: bool,
    per_workload: bool,
    include_kube_system: bool,
    existing: tuple[Path, ...],
    verify_flows: bool,
    istio_version: str,
    dataset: str,
    source: str,
) -> None:
    """Draft the network policies that allow exactly the traffic observed, and nothing else.

    Each workload gets an ingress and an egress policy (`flowpipe-<workload>`), each namespace a default-deny
    with the DNS allowance. Connections your current policy denied are never learned (unless
    --learn-from-drops). A draft is shown only after replaying the requests it was learned from (and the
    stored flows) through it breaks none of them. Edges that cannot be drafted (pods recorded with a reserved
    identity, unlabelled in-cluster addresses, what a format cannot express, invalid names) are left out and
    listed with what to do; the rest is drafted. The policies go to stdout, or to one file per namespace
    with --out; the summary goes to stderr. Nothing is applied to a cluster. A policy applies to one
    cluster: when the dataset holds flows of several clusters, choose one with --cluster.

    Exit status: 0 everything observed was drafted, 3 partial (some edges were left out, listed in the
    summary), 1 an error (nothing written), 2 a bad option.

    \b
    Examples:
      flowpipe suggest --namespace shop --since 7d
      flowpipe suggest --cluster eu-1 --namespace shop
      flowpipe suggest --policy-format both --l7 --out drafts/
      flowpipe suggest --existing policies/ --out additions/
      flowpipe suggest --format istio --l7 --istio-version 1.21
    """
    config = SuggestConfig(
        namespaces=namespaces,
        cluster=cluster or None,
        since=since,
        until=until,
        formats=FORMATS[output_format],
        l7=l7,
        learn_from_drops=learn_from_drops,
        per_workload=per_workload,
        include_kube_system=include_kube_system,
        existing=tuple(str(p) for p in existing),
        verify_flows=verify_flows,
        istio_version=istio_version,
    )
    default_window = click.get_current_context().get_parameter_source("since") == ParameterSource.DEFAULT
    with open_engine(dataset, require_flows=True, source=source) as engine:
        suggestion = suggest_policies(engine, config)
        coverage = window_coverage(engine, suggestion.since, suggestion.until) if default_window else None
    if suggestion.anchored_to == "data":
        click.echo(
            f"note: --since counts back from the newest record ({format_datetime(suggestion.until)}), not the "
            "clock",
            err=True,
        )
    if coverage is not None and coverage.partial:
        click.echo(coverage.note(suggestion.since, suggestion.until), err=True)
    if summary_format == "text":
        for line in suggestion.summary():
            click.echo(line, err=True)
    if out is not None:
        written = write_files(suggestion, out)
        click.echo(f"wrote {len(written)} files to {out}", err=True)
    elif suggestion.files:
        click.echo(suggestion.stream(), nl=False)
    if summary_format == "json":
        click.echo(json.dumps(suggestion.to_dict(), indent=2, ensure_ascii=False), err=out is None)
    if suggestion.partial:
        raise SystemExit(EXIT_PARTIAL)
