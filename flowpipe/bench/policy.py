"""The `suggest` and `replay` sections of `flowpipe bench`: drafting and replaying over ten million simulated flows.

Both run over one dataset of `SCALE_FACTOR x --flows` flows of the built-in simulator (all faults on), written
once per bench run through the real `ParquetSink` (`flowpipe.bench.questions.write_scaled_dataset`). With
`--workdir`, the dataset is kept and reused by later runs of the same size (a marker in `_state/` records it).

- `suggest`: `suggest_policies` over the whole span, as `flowpipe suggest` runs it (observed_edges question,
  drafts, replay proof on the learned requests and the stored flows, rendering): Cilium drafts against the
  20 s target, and Cilium plus Kubernetes with L7 rules beside it.
- `replay`: 200 policies (the drafts of both formats, with L7 rules, then copies of them under other names
  until there are 200, each selecting the same pods again) replayed over every stored flow, as
  `flowpipe replay` does, against the 30 s target.

Wall time is what the targets judge; CPU time and the machine's load stand beside it, because a shared machine
slows wall time down without the code being any slower.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from flowpipe.bench.context import BenchContext, Figure

SCALE_FACTOR = 10
"""Flows in the dataset = SCALE_FACTOR x `--flows` (ten million by default)."""
SUGGEST_TARGET_SECONDS = 20.0
REPLAY_TARGET_SECONDS = 30.0
REPLAY_POLICIES = 200
_MARKER = "_state/bench-policy.json"


def simulated_dataset(ctx: BenchContext) -> tuple[Path, int, datetime, datetime]:
    """The simulated dataset of both sections: (root, flows, start, end), written on first use."""
    from flowpipe.bench.questions import write_scaled_dataset

    if "policy_dataset" not in ctx.results:
        root = ctx.workdir / "simulated-policy"
        target = SCALE_FACTOR * ctx.flows
        marker = root / _MARKER
        known: dict[str, Any] = json.loads(marker.read_text()) if marker.is_file() else {}
        if known.get("target") == target and known.get("seed") == ctx.seed:
            ctx.log(f"reusing {known['flows']:,} simulated flows in {root}")
            flows, start, end = known["flows"], *(datetime.fromisoformat(known[k]) for k in ("start", "end"))
        else:
            shutil.rmtree(root, ignore_errors=True)
            started = time.perf_counter()
            flows, start, end = write_scaled_dataset(root, target, seed=ctx.seed, log=ctx.log)
            ctx.log(f"wrote {flows:,} simulated flows in {time.perf_counter() - started:.0f} s")
            marker.parent.mkdir(parents=True, exist_ok=True)
            record = {"target": target, "seed": ctx.seed, "flows": flows, "start": start.isoformat(),
                      "end": end.isoformat()}  # fmt: skip
            marker.write_text(json.dumps(record))
        ctx.results["policy_dataset"] = (root, flows, start, end)
    dataset: tuple[Path, int, datetime, datetime] = ctx.results["policy_dataset"]
    return dataset


def _measure(run: Any) -> tuple[Any, float, float, float]:
    """(result, wall seconds, CPU seconds, load average before) of calling `run()`."""
    load = os.getloadavg()[0]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu, started = usage.ru_utime + usage.ru_stime, time.perf_counter()
    result = run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return result, time.perf_counter() - started, usage.ru_utime + usage.ru_stime - cpu, load


def _note(cpu: float, load: float, extra: str = "") -> str:
    return f"{extra}CPU {cpu:.1f} s; load average {load:.1f} on {os.cpu_count()} cores"


def bench_suggest(ctx: BenchContext) -> list[Figure]:
    """Wall and CPU time of `suggest` over the whole simulated dataset."""
    from flowpipe.app.suggest import SuggestConfig, suggest_policies
    from flowpipe.query.engine import open_engine

    root, flows, start, end = simulated_dataset(ctx)
    since, until = start.isoformat(), end.isoformat()
    figures = []
    runs = (
        ("suggest (Cilium)", SuggestConfig(since=since, until=until), SUGGEST_TARGET_SECONDS),
        (
            "suggest --format both --l7",
            SuggestConfig(since=since, until=until, formats=("cilium", "kubernetes"), l7=True),
            None,
        ),
    )
    for name, config, target in runs:
        with open_engine(str(root)) as engine:
            suggestion, seconds, cpu, load = _measure(lambda: suggest_policies(engine, config))  # noqa: B023
        policies = sum(len(r.policies) for r in suggestion.results)
        extra = f"{flows:,} flows, {suggestion.edges:,} edges, {policies} policies; "
        figures.append(Figure("suggest", name, seconds, "s", target, False, _note(cpu, load, extra)))
    return figures


def replay_policies(ctx: BenchContext) -> list[Any]:
    """`REPLAY_POLICIES` policies for the simulated cluster: its drafts, then renamed copies of them."""
    from flowpipe.app.suggest import SuggestConfig, suggest_policies
    from flowpipe.policy.load import parse_policies
    from flowpipe.query.engine import open_engine

    root, _, start, end = simulated_dataset(ctx)
    config = SuggestConfig(
        since=start.isoformat(),
        until=end.isoformat(),
        formats=("cilium", "kubernetes"),
        l7=True,
        verify_flows=False,
    )
    with open_engine(str(root)) as engine:
        drafts = parse_policies(suggest_policies(engine, config).stream(), path="drafts")
    policies = list(drafts)
    copy = 1
    while len(policies) < REPLAY_POLICIES:
        for policy in drafts[: REPLAY_POLICIES - len(policies)]:
            policies.append(dataclasses.replace(policy, name=f"{policy.name}-copy-{copy}"))
        copy += 1
    return policies


def bench_replay(ctx: BenchContext) -> list[Figure]:
    """Wall and CPU time of replaying 200 policies over every simulated flow (grouping plus judging)."""
    from flowpipe.policy.replay import replay_edges
    from flowpipe.policy.stored_edges import EDGES_SQL, edge_parameters, prepare_edges
    from flowpipe.query.engine import open_engine

    root, flows, start, end = simulated_dataset(ctx)
    policies = replay_policies(ctx)

    def replay() -> tuple[int, Any]:
        with open_engine(str(root)) as engine:
            prepare_edges(engine)
            edges = engine.run(
                EDGES_SQL, edge_parameters(policies, since=start, until=end), question="replay"
            )
        return edges.num_rows, replay_edges(policies, edges)

    (edges, report), seconds, cpu, load = _measure(replay)
    extra = (
        f"{len(policies)} policies, {flows:,} flows in {edges:,} edges, {report.would_break:,} would break; "
    )
    return [Figure("replay", f"replay {len(policies)} policies", seconds, "s", REPLAY_TARGET_SECONDS, False,
                   _note(cpu, load, extra))]  # fmt: skip


DELTA_TARGET_SECONDS = 10.0


def proposed_change(policies: list[Any]) -> list[Any]:
    """The baseline set changed as a pull request would: the first allow rule with two ports or more loses its
    last port (in that policy and in its copies, which would allow it otherwise), a Cilium policy denies what
    its first ingress rule allows, and the first policy is renamed (no change by itself)."""
    from flowpipe.policy.model import PortRule

    target = next(
        (policy, ri, rule)
        for policy in policies
        for ri, rule in enumerate(policy.rules)
        if policy.selector.match_labels
        and rule.action == "allow"
        and rule.peers
        and len(rule.ports[0].ports) > 1
    )
    policy, ri, rule = target
    first = rule.ports[0]
    tightened = dataclasses.replace(
        rule, ports=(PortRule(ports=first.ports[:-1], http=first.http, kafka=first.kafka, dns=first.dns),
                     *rule.ports[1:])
    )  # fmt: skip
    proposed = []
    for other in policies:
        same = (other.namespace, other.selector) == (policy.namespace, policy.selector)
        if same and ri < len(other.rules) and other.rules[ri] == rule:
            rules = list(other.rules)
            rules[ri] = tightened
            other = dataclasses.replace(other, rules=tuple(rules))
        proposed.append(other)
    # and a deny rule: the first Cilium policy's first ingress rule, turned into `ingressDeny`
    ci, cilium, allow = next(
        (i, p, r)
        for i, p in enumerate(proposed)
        if p.flavour == "cilium" and p.selector.match_labels
        for r in p.rules_for("ingress")
        if r.peers and r.ports
    )
    deny = dataclasses.replace(allow, action="deny")
    proposed[ci] = dataclasses.replace(cilium, rules=(*cilium.rules, deny))
    proposed[0] = dataclasses.replace(proposed[0], name=f"{proposed[0].name}-renamed")
    return proposed


def bench_delta(ctx: BenchContext) -> list[Figure]:
    """Wall and CPU time of `replay PROPOSED --baseline CURRENT` with 200 policies on each side over every
    simulated flow: one grouping of the stored edges, judged by both sets."""
    from flowpipe.policy.delta import delta_parameters, replay_delta
    from flowpipe.policy.stored_edges import EDGES_SQL, prepare_edges
    from flowpipe.query.engine import open_engine

    root, flows, start, end = simulated_dataset(ctx)
    baseline = replay_policies(ctx)
    proposed = proposed_change(baseline)

    def delta() -> tuple[int, Any, float]:
        with open_engine(str(root)) as engine:
            prepare_edges(engine)
            edges = engine.run(
                EDGES_SQL,
                delta_parameters(proposed, baseline, since=start, until=end),
                question="replay delta",
            )
        judging = time.perf_counter()
        report = replay_delta(proposed, baseline, edges)
        return edges.num_rows, report, time.perf_counter() - judging

    (edges, report, judged), seconds, cpu, load = _measure(delta)
    extra = (
        f"{len(proposed)} policies on each side, {flows:,} flows in {edges:,} edges grouped once in "
        f"{seconds - judged:.1f} s and judged by both sets in {judged:.1f} s, "
        f"{report.newly_denied_requests:,} newly denied in {len(report.newly_denied)} edges, "
        f"{len(report.rules)} rule changes; "
    )
    return [Figure("delta", f"replay --baseline, {len(proposed)} policies a side", seconds, "s",
                   DELTA_TARGET_SECONDS, False, _note(cpu, load, extra))]  # fmt: skip
