"""The Python API for notebooks: open a dataset, ask a question, get Arrow or pandas, every row once."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner
from support.small_files import LAST_HOUR, simulated_flows, sorted_rows, write_small_files

import flowpipe
import flowpipe.dataset.compact as compact_module
from flowpipe.cli import cli
from flowpipe.dataset.compact import compact_dataset
from flowpipe.dataset.layout import Dataset
from flowpipe.errors import EmptyDatasetError, QuestionParameterError, UnknownQuestionError

ALL_TIME = {"since": "2000-01-01", "until": "2100-01-01"}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api") / "ds"
    write_small_files(root, simulated_flows())
    return root


@pytest.fixture
def small(tmp_path: Path, template: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "ds"))


def test_a_question_gives_the_rows_the_command_prints(small: Path) -> None:
    with flowpipe.open_dataset(small) as data:
        assert "unexpected_drops" in data.questions() and "dns_failures" in data.questions()
        assert "parameters: since" in data.describe("top_talkers")
        table = data.question("top_talkers", limit=5, **ALL_TIME)
    assert isinstance(table, pa.Table) and 0 < table.num_rows <= 5
    window = ["--since", ALL_TIME["since"], "--until", ALL_TIME["until"]]
    args = ["query", "top_talkers", "--dataset", str(small), "--last", "5", "-o", "json", *window]
    printed = CliRunner().invoke(cli, args)
    assert printed.exit_code == 0, printed.output
    rows = json.loads(printed.stdout)
    assert [r["flows"] for r in rows] == table.column("flows").to_pylist()
    assert [r["source_workload"] for r in rows] == table.column("source_workload").to_pylist()


def test_pandas_frames_and_sql_with_bound_parameters(small: Path) -> None:
    with flowpipe.open_dataset(str(small)) as data:
        frame = data.frame("drops_by_reason", **ALL_TIME)
        assert list(frame.columns) == data.question("drops_by_reason", **ALL_TIME).column_names
        verdicts = data.sql_frame(
            "SELECT verdict, count(*) AS n FROM flows WHERE verdict = $verdict GROUP BY ALL",
            verdict="DROPPED",
        )
        assert verdicts["verdict"].tolist() == ["DROPPED"] and verdicts["n"].iloc[0] > 0
        injected = data.sql("SELECT count(*) AS n FROM flows WHERE verdict = $v", v="x' OR '1'='1")
        assert injected.column("n").to_pylist() == [0]


def test_each_row_once_while_compaction_runs(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    total = sorted_rows(small).num_rows
    with flowpipe.open_dataset(small) as data:
        assert data.sql("SELECT count(*) AS n FROM flows").column("n")[0].as_py() == total
        # a compaction caught between writing its merged files and removing their inputs
        monkeypatch.setattr(compact_module, "_remove", lambda *args, **kwargs: 0)
        report = compact_dataset(Dataset(small), clock=lambda: LAST_HOUR + timedelta(minutes=80))
        assert report.files_written
        assert data.sql("SELECT count(*) AS n FROM flows").column("n")[0].as_py() == total
        during = data.question("drops_by_reason", **ALL_TIME)
    with flowpipe.open_dataset(small) as fresh:
        assert during.equals(fresh.question("drops_by_reason", **ALL_TIME))


def test_new_files_are_seen_by_the_next_call(small: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    write_small_files(extra, simulated_flows())
    with flowpipe.open_dataset(small) as data:
        before = data.sql("SELECT count(*) AS n FROM flows").column("n")[0].as_py()
        for part in (extra / "flows").rglob("*.parquet"):
            target = small / part.relative_to(extra)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(part, target.with_name("part-late-" + part.name.removeprefix("part-")))
        after = data.sql("SELECT count(*) AS n FROM flows").column("n")[0].as_py()
    assert after == 2 * before


def test_errors_are_flowpipe_errors(small: Path, tmp_path: Path) -> None:
    with pytest.raises(EmptyDatasetError, match="does not exist"):
        flowpipe.open_dataset(tmp_path / "nothing")
    with flowpipe.open_dataset(tmp_path / "nothing", require_flows=False) as empty:
        assert empty.question("top_talkers").num_rows == 0
    with flowpipe.open_dataset(small) as data:
        with pytest.raises(UnknownQuestionError):
            data.question("top_talker")
        with pytest.raises(QuestionParameterError, match="no parameter lmit"):
            data.question("top_talkers", lmit=3)


def test_sql_reads_the_dataset_and_nothing_else_unless_allowed(small: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    copy = f"COPY (SELECT count(*) AS n FROM flows) TO '{target}'"
    with flowpipe.open_dataset(small) as data, pytest.raises(flowpipe.FlowpipeError, match="COPY"):
        data.sql(copy)
    assert not target.exists()
    with flowpipe.open_dataset(small, external_access=True) as data:
        data.sql(copy)
    assert target.read_text().splitlines()[0] == "n"
