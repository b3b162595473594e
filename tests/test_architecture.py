"""The shape of the package: no import circle (counting imports inside functions and for type hints),
and a run.py that only hands over to gradmm.cli."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "gradmm"


def _imports(path: Path) -> set[str]:
    """The gradmm modules a module imports anywhere in its text (top level, functions, TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "gradmm":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradmm."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("gradmm.")}
    return found


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    circles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph.get(module, ())):
            if imported in path:
                circles.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, [*path, imported])
        done.add(module)

    for module in sorted(graph):
        visit(module, [module])
    return circles


def test_no_import_circle():
    graph = {path.stem: _imports(path) for path in PACKAGE.glob("*.py")}
    assert _circles(graph) == []


def test_an_import_circle_is_found():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_run_py_only_hands_over_to_the_command_line_module():
    text = (REPO / "run.py").read_text()
    assert len(text.splitlines()) < 40
    assert "gradmm.cli" in text


def test_no_module_is_over_350_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 350} == {}


SCIENCE = ("gradients", "matched", "admm", "projection", "matching_context", "matching_projection", "privacy")
# What the science may not know about: how a job is configured, tracked, ordered, or where its data come from.
FORBIDDEN = {"schemas", "identity", "validation", "pipeline", "tasks", "tracking", "generate", "cli"}


def _third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    return found | {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}


def test_science_modules_take_plain_values():
    for name in SCIENCE:
        path = PACKAGE / f"{name}.py"
        assert not _imports(path) & FORBIDDEN, name
        assert not _third_party(path) & {"omegaconf", "hydra"}, name
