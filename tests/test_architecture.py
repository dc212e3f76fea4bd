"""The package's shape, read from its imports: no module imports itself back through others (no circles), and
no module imports one of a higher layer. The layers are the pipeline's stages, lowest first; a module may import
its own layer and the layers below it. Imports inside functions count as much as those at the top."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flowpipe"

LAYERS: tuple[tuple[str, ...], ...] = (
    # the package's face and core vocabulary: errors, the flow table, configuration, drop reasons
    ("flowpipe", "flowpipe.errors", "flowpipe.model", "flowpipe.config", "flowpipe.drop_reasons"),
    ("flowpipe._proto", "flowpipe._resources"),
    # the SQL views over the flow table (SQL files and the core vocabulary only): the dataset's edge rollups
    # are built with the same views the questions read, so they sit below the dataset
    ("flowpipe.query.timeparse", "flowpipe.query.catalog", "flowpipe.query.views"),
    ("flowpipe.dataset",),  # layout, storage, compaction, retention, leases, stored flow uuids
    ("flowpipe.transforms",),  # Hubble records <-> the flow table
    ("flowpipe.query",),  # the engine over the dataset and the named questions
    ("flowpipe.metrics.families",),  # the metric families a running pipeline keeps
    ("flowpipe.sources", "flowpipe.sinks"),
    ("flowpipe.pipeline",),  # source -> sinks, commits once durable
    ("flowpipe.metrics",),  # periodic questions, the metrics server of a dataset
    ("flowpipe.policy",),
    ("flowpipe.server",),
    ("flowpipe.sim",),
    ("flowpipe.app", "flowpipe.api"),  # use cases and the Python API
    ("flowpipe.bench",),
    ("flowpipe.cli", "flowpipe.__main__"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> Iterator[str]:
    """The flowpipe modules `name` imports (`from package import module` names the module)."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] == "flowpipe")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            if source.split(".")[0] != "flowpipe":
                continue
            for alias in node.names:
                yield f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source


@cache
def graph() -> dict[str, frozenset[str]]:
    return {
        name: frozenset(target for target in imported(name, path) if target != name)
        for name, path in modules().items()
        if not name.startswith("flowpipe._proto")  # generated
    }


def layer(name: str) -> int:
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{name} belongs to no layer: add it to LAYERS")
    return best


def test_every_module_has_a_layer_and_every_import_names_a_module() -> None:
    known = modules()
    for name, targets in graph().items():
        layer(name)
        assert all(target in known for target in targets), (name, sorted(targets - known.keys()))


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        for name, targets in graph().items()
        for target in sorted(targets)
        if layer(target) > layer(name)
    ]
    assert upward == []


def test_no_import_circles() -> None:
    edges = graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(edges.get(name, ())):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name)
    assert circles == []


@pytest.mark.parametrize("name", ["flowpipe.cli", "flowpipe.query"])
def test_the_light_entry_points_import_no_data_library_at_the_top(name: str) -> None:
    """What `import flowpipe.cli` runs stays light (the startup test in test_cli_conventions measures it)."""
    heavy = {"pyarrow", "duckdb", "pandas", "numpy", "grpc", "google"}
    tree = ast.parse(modules()[name].read_text())
    top = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    named = {alias.name.split(".")[0] for node in top if isinstance(node, ast.Import) for alias in node.names}
    named |= {(node.module or "").split(".")[0] for node in top if isinstance(node, ast.ImportFrom)}
    assert named & heavy == set()
