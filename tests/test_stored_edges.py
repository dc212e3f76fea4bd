"""The edge grouping gives the same edges whether or not its lookup views were prepared (computed once)."""

from __future__ import annotations

from typing import Any

import pytest

from flowpipe.policy.stored_edges import EDGES_SQL, prepare_edges
from flowpipe.query.engine import open_engine

_FLAGS = {"addresses": True, "names": True, "http": True, "kafka": True, "dns": True}


def _rows(table: Any) -> list[str]:
    columns = sorted(table.column_names)
    return sorted(repr(tuple(row[c] for c in columns)) for row in table.to_pylist())


@pytest.mark.parametrize("flags", [_FLAGS, dict.fromkeys(_FLAGS, False)])
def test_prepared_grouping_gives_the_same_edges(sim_faults: Any, flags: dict[str, bool]) -> None:
    params = {"since": None, "until": None, "cluster": None, **flags}
    with open_engine(str(sim_faults.root)) as engine:
        plain = engine.run(EDGES_SQL, params)
    with open_engine(str(sim_faults.root)) as engine:
        prepare_edges(engine)
        prepare_edges(engine)  # a second time: already prepared
        ((definition,),) = engine.connection.execute(
            "SELECT sql FROM duckdb_views() WHERE view_name = 'identity_workloads'"
        ).fetchall()
        prepared = engine.run(EDGES_SQL, params)
    # the simulator's faults include pods known only by identity and labels: the lookup is in use, and a table
    assert "_flowpipe_identity_workloads" in definition
    assert plain.num_rows > 100
    assert _rows(prepared) == _rows(plain)
