"""The layout's one direction of imports (docs/development.md, "Layout"): the command line
(triage/) wires the doors (producer/, consumer/, gateway/), which use the transport-free core
(scoring/), which uses the model and the contracts (model/, schemas/), which use the bus
(bus/). Every import of every module is read from its source, the ones inside functions
included, so a lazy import cannot slip past."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bus", "schemas", "model", "scoring", "producer", "consumer", "gateway", "bench",
            "triage")
# What each folder may import of the project (besides itself). bench/ is a tool that drives
# everything; triage/ is the command line.
ALLOWED = {
    "bus": set(),
    "schemas": {"bus"},
    "model": {"bus"},
    "scoring": {"model", "schemas", "bus"},
    "producer": {"model", "schemas", "bus"},
    "consumer": {"scoring", "producer", "model", "schemas", "bus"},
    "gateway": {"scoring", "producer", "model", "schemas", "bus"},
    "bench": {"gateway", "consumer", "producer", "scoring", "model", "schemas", "bus"},
    "triage": set(PACKAGES),
}


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module
            for alias in node.names:  # from triage import cli
                yield node.lineno, f"{node.module}.{alias.name}"


def project_imports(folder: str) -> Iterator[tuple[str, int, str]]:
    """(file, line, folder imported) of every import of another project folder."""
    for path in sorted((ROOT / folder).glob("*.py")):
        for line, module in imports(path):
            parts = module.split(".")
            if parts[0] != "triage" or len(parts) < 2:
                continue
            target = parts[1] if parts[1] in PACKAGES else "triage"
            if target != folder:
                yield path.relative_to(ROOT).as_posix(), line, target


@pytest.mark.parametrize("folder", PACKAGES)
def test_imports_flow_one_way(folder: str) -> None:
    wrong = [f"{file}:{line} imports {target}/" for file, line, target in
             project_imports(folder) if target not in ALLOWED[folder]]
    assert not wrong, f"{folder}/ may import only {sorted(ALLOWED[folder])}: {wrong}"


def test_the_gateway_imports_nothing_from_the_kafka_worker() -> None:
    assert not [f"{file}:{line}" for file, line, target in project_imports("gateway")
                if target == "consumer"]


def test_the_scoring_core_holds_no_kafka_client() -> None:
    """The Kafka readers it needs are in bus/ and take callbacks."""
    found = [f"{path.name}:{line}" for path in sorted((ROOT / "scoring").glob("*.py"))
             for line, module in imports(path) if module.split(".")[0] == "confluent_kafka"]
    assert not found


def test_every_folder_is_checked() -> None:
    """A new top-level package must be given its place above."""
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert folders <= set(PACKAGES), sorted(folders - set(PACKAGES))


def test_the_rules_have_no_cycle() -> None:
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(folder: str) -> None:
        seen[folder] = 1
        for target in ALLOWED[folder] - {"triage"}:
            assert seen.get(target) != 1, f"{folder} -> {target} closes a cycle"
            if target not in seen:
                visit(target)
        seen[folder] = 2

    for folder in PACKAGES:
        if folder not in seen and folder != "triage":
            visit(folder)
