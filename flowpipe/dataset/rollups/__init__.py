"""Edge rollups: the first step of the edge definition stored per flow part file, for months of history.

Raw flows answer every question but cost 50 bytes a flow; the questions about edges (observed_edges,
new_connections, top_talkers, cross_namespace, world_egress, and `suggest` through observed_edges) need only
the rows of the shared view `edge_observations`: each observer's records of each request, keyed by connection
(5-tuple, or ICMP / L7 call and side) and observer, with a record count and first and last time. Those rows add
up over any split of the flows (records are summed, times take min and max, descriptions min), so:

- `build`: each published flow part file `<dataset>/flows/date=D/hour=H/NAME` gets its rollup
  `<dataset>/edges/date=D/hour=H/NAME` (and the workloads it names per pod identity,
  `<dataset>/edge_identities/date=D/hour=H/NAME`), built once it is published by the writer's background
  thread (collect, ingest; `build.RollupBuilder`) or by compaction. The rollup is named after the flow file it
  summarises: building it again gives the same file, so a crash between the two writes is repaired by
  building the missing one, never by counting twice.
- `read`: a query over `--source auto` reads, for every hour whose flow files all have their rollup (or whose
  flows are past their retention), the rollup rows, and raw flows for the other hours (the open hour, the
  files of a crashed writer); the view `connections` merges both into the same rows the flows alone give.
  `--source edges` reads rollups only, `--source flows` flows only.
- `fold`: once an hour is closed (compaction, `flowpipe rollup`, retention), its rollups are merged into one
  row per edge and hour (`<dataset>/edge_hours/`), and a closed day's hours into one row per edge and day
  (`<dataset>/edge_days/`), which questions read for the hours and days their window holds whole.
- `privilege_hours` / `privilege_days`: when an hour is folded, the rows of the view `privilege_records` (what
  least_privilege judges: each request from the side whose policy decides it, its policy verdict and L7 call)
  are folded from the hour's flows too (the denials of either end are in that hour), and a closed day's folded
  hours again; least_privilege reads them as the edge questions read `edge_hours` and `edge_days`.
- Retention keeps rollups apart (`retention --keep 3d --keep-edges 400d`); `flowpipe rollup --rebuild` writes
  them for flows written before rollups existed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import datetime

EDGES_TABLE = "edges"
"""The rollup rows (`edge_observations` per flow part file)."""
EDGE_IDENTITIES_TABLE = "edge_identities"
"""Per flow part file, the workload Cilium reported for each pod identity (`identity_workloads`)."""
EDGE_HOURS_TABLE = "edge_hours"
"""An hour's rollups folded by edge once the hour is closed (`flowpipe.dataset.rollups.fold`)."""
EDGE_DAYS_TABLE = "edge_days"
"""A closed day's folded hours folded again by edge (`date=D/hour=00/`), for windows of weeks and months."""
PRIVILEGE_HOURS_TABLE = "privilege_hours"
"""A closed hour's `privilege_records` (what least_privilege judges) folded by every column but the time, written
from the hour's flows when its edges are folded (`flowpipe.dataset.rollups.fold`), named as `edge_hours`."""
PRIVILEGE_DAYS_TABLE = "privilege_days"
"""A closed day's folded privilege hours folded again (`date=D/hour=00/`), as `edge_days`."""
ROLLUP_TABLES: tuple[str, ...] = (
    EDGES_TABLE,
    EDGE_IDENTITIES_TABLE,
    EDGE_HOURS_TABLE,
    EDGE_DAYS_TABLE,
    PRIVILEGE_HOURS_TABLE,
    PRIVILEGE_DAYS_TABLE,
)
CUTS_VARIABLE = "flowpipe_window_cuts"
"""A DuckDB variable: the times of a question's window (since, until, ...), which the query engine sets before
it runs one; an hour of folded rollups is read only when none of them falls inside it."""
SOURCES: tuple[str, ...] = ("auto", "edges", "flows")
"""Where edge questions read: rollups where they cover an hour and flows for the rest, rollups only, flows only."""
EDGE_QUESTIONS: tuple[str, ...] = (
    "observed_edges",
    "new_connections",
    "top_talkers",
    "cross_namespace",
    "world_egress",
    "least_privilege",
)
"""The questions that rollups answer: those that read edges only (the view `connections`; `suggest` drafts from
observed_edges), and least_privilege, which reads the view `privilege_records` (folded by hour and day as
`privilege_hours` and `privilege_days`). Other questions (drops, DNS, HTTP) read the flows' own records."""
PRIVILEGE_QUESTIONS: tuple[str, ...] = ("least_privilege",)
"""Of `EDGE_QUESTIONS`, those that read folded privilege records (`privilege_hours`, `privilege_days`) for the
hours whose flows are gone, not edge rollups: rollups written before they existed have none."""


FOLD_PREFIX = "hour-"
"""An hour's folded file: the folded rows of the flow files it is named after."""
KEPT_PREFIX = "kept-"
"""An hour's kept file: the folded rows of flow files that are gone (past the raw retention), kept apart from
any flows written into the hour later, so that folding the hour again never loses them."""


def fold_name(flow_names: Iterable[str]) -> str:
    """The folded file's name for an hour holding exactly the flow files `flow_names`."""
    digest = hashlib.sha256("\n".join(sorted(flow_names)).encode()).hexdigest()[:24]
    return f"{FOLD_PREFIX}{digest}.parquet"


def kept_name(fold_file: str) -> str:
    """The kept file's name for the folded file `fold_file` (a name or path) whose flows went."""
    return KEPT_PREFIX + fold_file.rpartition("/")[2].removeprefix(FOLD_PREFIX)


def day_name(hours: Mapping[datetime, str | Iterable[str]]) -> str:
    """The folded day's name for a day whose hours are folded in the files `hours` (hour → path, or the paths
    of its folded and kept files). A folded file and the kept file it becomes name the day alike."""

    def digests(files: str | Iterable[str]) -> list[str]:
        names = [files] if isinstance(files, str) else list(files)
        return sorted(name.rpartition("/")[2].partition("-")[2] for name in names)

    listed = "\n".join(f"{hour:%H} {' '.join(digests(files))}" for hour, files in sorted(hours.items()))
    return f"day-{hashlib.sha256(listed.encode()).hexdigest()[:24]}.parquet"
