"""`flowpipe suggest`: draft least-privilege policies from the stored flows, proved by replay before they are shown."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import click

from flowpipe._cli_options import dataset_option, one_value
from flowpipe._output import format_datetime
from flowpipe.query.engine import open_engine
from flowpipe.suggest import FORMATS, SuggestConfig, suggest_policies, write_files


def _help(name: str) -> str:
    return str(next(f for f in fields(SuggestConfig) if f.name == name).metadata["help"])


@click.command("suggest")
@click.option("--namespace", "-n", "namespaces", multiple=True, metavar="NS", help=_help("namespaces"))
@click.option("--cluster", metavar="NAME", multiple=True, callback=one_value, help=_help("cluster"))
@click.option("--since", default="7d", show_default=True, help=_help("since"))
@click.option("--until", default="now", show_default=True, help=_help("until"))
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
@dataset_option
def suggest(
    namespaces: tuple[str, ...],
    cluster: str | None,
    since: str,
    until: str,
    output_format: str,
    out: Path | None,
    l7: bool,
    learn_from_drops: bool,
    per_workload: bool,
    include_kube_system: bool,
    existing: tuple[Path, ...],
    verify_flows: bool,
    dataset: str,
) -> None:
    """Draft the network policies that allow exactly the traffic observed, and nothing else.

    Each workload gets an ingress and an egress policy (`flowpipe-<workload>`), each namespace a default-deny
    with the DNS allowance. A draft is shown only after replaying the requests it was learned from (and the
    stored flows) through it breaks none of them. The policies go to stdout, or to one file per namespace
    with --out; a summary goes to stderr. Nothing is applied to a cluster. A policy applies to one cluster:
    when the dataset holds flows of several clusters, choose one with --cluster.

    \b
    Examples:
      flowpipe suggest --namespace shop --since 7d
      flowpipe suggest --cluster eu-1 --namespace shop
      flowpipe suggest --policy-format both --l7 --out drafts/
      flowpipe suggest --existing policies/ --out additions/
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
    )
    with open_engine(dataset, require_flows=True) as engine:
        suggestion = suggest_policies(engine, config)
    if suggestion.anchored_to == "data":
        click.echo(
            f"note: --since counts back from the newest flow ({format_datetime(suggestion.until)}), not the clock",
            err=True,
        )
    for line in suggestion.summary():
        click.echo(line, err=True)
    if out is not None:
        written = write_files(suggestion, out)
        click.echo(f"wrote {len(written)} files to {out}", err=True)
    elif suggestion.files:
        click.echo(suggestion.stream(), nl=False)
