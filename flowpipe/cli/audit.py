"""`flowpipe audit`: check policy files for the pitfalls that break clusters; non-zero exit for CI."""

from __future__ import annotations

import json

import click
import pyarrow as pa

from flowpipe.cli._options import dataset_option, format_option
from flowpipe.cli._output import render
from flowpipe.cli._review import (
    FINDINGS_EXIT_CODE,
    load_policy_input,
    report_file_options,
    sarif_text,
    write_report,
)
from flowpipe.policy.audit import INVENTORY_SQL, SEVERITIES, Inventory, at_or_above, audit_policies
from flowpipe.policy.review import audit_junit, audit_sarif, junit_text
from flowpipe.query.engine import open_engine


@click.command("audit")
@click.argument("paths", nargs=-1, required=True, metavar="POLICY_FILE_OR_DIR...")
@click.option(
    "--fail-on",
    type=click.Choice(SEVERITIES),
    default="high",
    show_default=True,
    help="Exit with status 1 when a finding is at or above this severity.",
)
@report_file_options
@dataset_option
@format_option("table", "json", "jsonl")
def audit(
    paths: tuple[str, ...],
    fail_on: str,
    sarif_path: str | None,
    junit_path: str | None,
    dataset: str,
    output_format: str,
) -> None:
    """Check Kubernetes and Cilium policy files for known pitfalls.

    Namespaces without default-deny, default-deny egress without DNS, empty from/to (allow-all), default-deny
    in kube-system; with flows in the dataset also namespace selectors and pod selectors that match nothing
    observed. Each finding has a severity, the file and policy, and what to do.

    Exit status: 0 when no finding is at or above --fail-on; 1 when one is (or the dataset cannot be read); 2
    when the policy input is invalid (a file that is missing, not YAML or not a policy; no policy found) or a
    flag is wrong, so CI tells a finding from a broken input.

    \b
    Examples:
      flowpipe audit policies/
      flowpipe audit policies/ --fail-on medium -o jsonl
      flowpipe audit policies/ --sarif audit.sarif --junit audit.xml
    """
    policies = load_policy_input(paths)
    with open_engine(dataset, require_flows=False) as engine:
        inventory = (
            Inventory.from_rows(engine.run(INVENTORY_SQL, question="observed workloads"))
            if engine.has_flows
            else None
        )
    if inventory is None:
        click.echo(f"note: no flows in {dataset}; checks against the observed cluster were skipped", err=True)
    findings = audit_policies(policies, inventory)
    if output_format == "json":
        click.echo(json.dumps([f.to_dict() for f in findings], indent=2, ensure_ascii=False))
    elif output_format == "jsonl":
        for finding in findings:
            click.echo(json.dumps(finding.to_dict(), ensure_ascii=False))
    else:
        table = pa.Table.from_pylist(
            [
                {
                    "severity": f.severity,
                    "check": f.check,
                    "where": f.policy or f.namespace,
                    "file": f.file,
                    "finding": f.message,
                    "what to do": f.suggestion,
                }
                for f in findings
            ],
            schema=pa.schema(
                [
                    (name, pa.string())
                    for name in ("severity", "check", "where", "file", "finding", "what to do")
                ]
            ),
        )
        render(table, "table", title=f"audit of {len(policies)} policies")
    write_report(sarif_path, sarif_text(audit_sarif(findings, policies)))
    write_report(junit_path, junit_text(audit_junit(findings, policies, fail_on)))
    failing = at_or_above(findings, fail_on)  # type: ignore[arg-type]
    if failing:
        click.echo(f"{len(failing)} finding(s) at or above {fail_on}", err=True)
        raise click.exceptions.Exit(FINDINGS_EXIT_CODE)
