"""The equality part of `flowpipe bench --only rollups`, run small: its flows, streamed from the simulator,
span whole hours and a whole UTC day, both are folded, and every edge question and `suggest` answer the same from
rollups as from the flows."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from flowpipe.bench.context import BenchContext
from flowpipe.bench.rollups import EQUALITY_START, bench_equality, equality_flows
from flowpipe.dataset.layout import Dataset
from flowpipe.dataset.rollups import EDGE_DAYS_TABLE, EDGE_HOURS_TABLE, EDGE_QUESTIONS


def test_equality_on_streamed_flows_over_a_day(tmp_path: Path) -> None:
    flows = 300
    figures = {f.name: f.as_dict() for f in bench_equality(BenchContext(flows=flows, workdir=tmp_path))}
    equal = figures["edge questions equal from rollups"]
    assert equal["target"] == len(EDGE_QUESTIONS) and equal["ok"], equal
    assert f"{equality_flows(flows):,} simulated flows" in equal["note"]
    assert figures["suggest drafts equal from rollups"]["ok"], figures["suggest drafts equal from rollups"]
    assert 0 < figures["equality peak RSS"]["value"]
    # the flows span the end of a day, a whole day and the start of the next: hours and days folded
    dataset = Dataset(tmp_path / "rollups-equal")
    days = {Path(p).parent.parent.name for p in dataset.list_part_files(EDGE_DAYS_TABLE)}
    assert days == {f"date={EQUALITY_START.date() + timedelta(days=d)}" for d in range(3)}
    hours = dataset.list_part_files(EDGE_HOURS_TABLE)
    assert len(hours) > 24
    # the answers compared are there, and not empty
    answers = tmp_path / "rollups-equal-answers"
    for source in ("flows", "edges"):
        assert (answers / source / "observed_edges.1.txt").read_text()
        assert (answers / source / "suggest.txt").read_text().startswith("# ")
