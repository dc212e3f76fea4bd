"""`flowpipe demo`: a simulated cluster behind a relay on loopback, collected over gRPC, then the answers.

No configuration: the built-in Observer server starts on a free 127.0.0.1 port and serves a few simulated minutes
of a cluster with injected trouble; `collect` follows it into a fresh dataset (the same code path as against
hubble-relay); then the drops by reason, the failing DNS lookups and the unexpected drops are printed, with the
commands to go further.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from flowpipe.app.collect import CollectResult
from flowpipe.app.demo import ask_questions, collect_from_relay, fresh_dataset, simulate_cluster
from flowpipe.cli._output import render
from flowpipe.errors import FlowpipeError

ROWS_SHOWN = 8


def _collect_from_relay(flows: list[bytes], dataset: Path, console: Console) -> CollectResult:
    """Collect `flows` from the built-in relay with a progress bar."""
    with Progress(
        TextColumn("collect over gRPC from {task.fields[address]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:,} flows"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("collect", total=len(flows), address="the built-in relay")
        return collect_from_relay(
            flows,
            dataset,
            on_started=lambda address: progress.update(task, address=address),
            on_progress=lambda received: progress.update(task, completed=received),
        )


def _ask(dataset: Path, console: Console) -> None:
    for name, title, columns, answer in ask_questions(dataset):
        if isinstance(answer, FlowpipeError):
            console.print(f"[red]{name} failed:[/] {answer}")
            continue
        shown = answer.slice(0, ROWS_SHOWN)
        shown = shown.select([c for c in columns if c in shown.column_names] or shown.column_names)
        more = f" (first {ROWS_SHOWN} of {answer.num_rows}; all: {program()} query {name} --dataset {_q(dataset)})"
        console.print()
        render(shown, "table", title=f"{title}: {name}" + (more if answer.num_rows > ROWS_SHOWN else ""))


def program(path: str | None = None) -> str:
    """How to run flowpipe from the user's shell, as it is running now: `flowpipe` when that is what the PATH
    finds, else the path of this environment's script (relative when under the working folder, as
    `.venv/bin/flowpipe` after `make demo`), else `python -m flowpipe` with this interpreter."""
    search = os.environ.get("PATH", "") if path is None else path
    script = Path(sys.executable).parent / "flowpipe"
    found = shutil.which("flowpipe", path=search)
    if found is not None and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "flowpipe"
    if script.exists():
        try:
            return shlex.quote(str(script.relative_to(Path.cwd())))
        except ValueError:
            return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m flowpipe"


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def _next_steps(dataset: Path) -> list[str]:
    """The commands to go further, each runnable as printed from the folder the demo ran in."""
    run, data = program(), f"--dataset {_q(dataset)}"
    steps = [
        ("every question", f"{run} query --list"),
        ("one of them", f"{run} query top_talkers {data}"),
        ("expected drops too", f"{run} query unexpected_drops {data} -p show_expected=true"),
        ("your own SQL", f'{run} sql "SELECT verdict, count(*) FROM flows GROUP BY ALL" {data}'),
        ("draft policies", f"{run} suggest {data}"),
        ("Prometheus metrics", f"{run} serve-metrics {data}"),
        ("a simulated relay", f"{run} simulate-relay"),
        ("collect from it", f"{run} collect --server 127.0.0.1:4245 --dataset flowpipe-data"),
    ]
    return [f"{what + ':':20} {command}" for what, command in steps]


@click.command("demo")
@click.option("--dataset", default=None, metavar="DIR", help="Where to write the dataset (a new or empty folder). "
              "Default: a new temporary folder, kept afterwards for the commands the demo prints (it says "
              "where, and how to remove it).")  # fmt: skip
@click.option("--minutes", type=click.FloatRange(min=0.1, max=120), default=10.0, show_default=True,
              help="Simulated minutes of cluster traffic.")  # fmt: skip
@click.option("--rate", type=click.FloatRange(min=1, max=5000), default=100.0, show_default=True,
              help="Average simulated flows per second.")  # fmt: skip
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the simulated cluster.")
def demo(dataset: str | None, minutes: float, rate: float, seed: int) -> None:
    """Try flowpipe with no cluster: collect a simulated relay over gRPC, then see what went wrong in it.

    A simulated cluster (web shop, Kafka, CoreDNS, monitoring) with injected trouble (failing lookups, DNS
    blocked by a default-deny, a port scan, a policy regression, conntrack drops) is served on 127.0.0.1 by the
    built-in Observer server, collected into a fresh dataset, and asked the drops, DNS and unexpected-drops
    questions. Takes a few seconds.
    """
    console = Console(stderr=True)
    folder = fresh_dataset(dataset)
    started = time.monotonic()
    console.print(f"simulating {minutes:g} minutes of a cluster at about {rate:g} flows/s ...")
    simulator, flows = simulate_cluster(minutes, rate, seed)
    result = _collect_from_relay(flows, folder, console)
    run = result.pipeline
    truth = simulator.ground_truth()
    console.print(
        f"collected {run.flows:,} flows ({truth.totals.get('dropped', 0):,} dropped by the simulated Cilium) into "
        f"{folder} in {time.monotonic() - started:.1f}s; injected faults: {', '.join(truth.faults_enabled) or 'none'}"
    )
    _ask(folder, Console())
    click.echo("\nwhere to look next:")
    for step in _next_steps(folder):
        click.echo(f"  {step}")
    if program() != "flowpipe":
        click.echo(
            f"\n`flowpipe` is not on your PATH: run it as {program()}, or put it there with "
            f"`source {shlex.quote(str(Path(sys.executable).parent / 'activate'))}`."
        )
    if dataset is None:
        click.echo(
            f"\nThe demo's dataset is kept in {folder} for these commands; remove it with: rm -r {_q(folder)}"
        )
