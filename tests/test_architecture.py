"""The shape of the package: subpackages named after the architecture, no import circle (counting imports
inside functions and for type hints), science that takes plain values, a run.py that only hands over to
gradmm.cli, and configs that open with how to use them."""

import ast
from pathlib import Path

from conftest import CONF_DIR, REPO

SRC = REPO / "src"
PACKAGE = SRC / "gradmm"


def _name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """The gradmm modules a module imports anywhere in its text (top level, functions, TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradmm"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("gradmm.")}
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
    graph = {name: _imports(path) - {"gradmm"} for name, path in MODULES.items()}
    assert _circles(graph) == []


def test_an_import_circle_is_found():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_every_import_names_a_module_that_exists():
    """A module imported by its full name (not through a namespace that would find an old copy)."""
    missing = {name: sorted(m for m in _imports(path) if m not in MODULES) for name, path in MODULES.items()}
    assert {name: found for name, found in missing.items() if found} == {}


def test_the_package_is_subpackages_named_after_the_architecture():
    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert len(subpackages) >= 4
    assert set(subpackages) >= {"method", "privacy", "stages", "runs", "config", "reporting", "data"}


def test_no_two_module_names_differ_only_by_a_plural():
    stems = {path.stem for path in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    assert sorted(s for s in stems if f"{s}s" in stems or f"{s}es" in stems) == []


def test_run_py_only_hands_over_to_the_command_line_module():
    text = (REPO / "run.py").read_text()
    assert len(text.splitlines()) <= 40
    assert "gradmm.cli" in text


# The science: what the method computes, on plain values.
SCIENCE = sorted(name for name in MODULES if name.startswith(("gradmm.method.", "gradmm.privacy.")))
# What the science may not know about: how a job is configured, tracked, ordered, or where its data come from.
FORBIDDEN = ("gradmm.config", "gradmm.reporting.tracking", "gradmm.data.tasks", "gradmm.pipeline", "gradmm.stages",
             "gradmm.cli")


def _third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    return found | {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}


def test_science_modules_take_plain_values():
    assert len(SCIENCE) >= 6
    for name in SCIENCE:
        path = MODULES[name]
        assert not [m for m in _imports(path) if m.startswith(FORBIDDEN)], name
        assert not _third_party(path) & {"omegaconf", "hydra"}, name


def test_config_checks_configs_and_builds_no_stage():
    """Validation reads the components that `_target_` names (gradmm.method, gradmm.config.components),
    never a stage."""
    config = [name for name in MODULES if name.startswith("gradmm.config.")]
    assert {name: sorted(m for m in _imports(MODULES[name]) if m.startswith(("gradmm.stages", "gradmm.pipeline")))
            for name in config} == {name: [] for name in config}


def test_every_config_file_opens_with_a_comment():
    """Each yaml says what it is and how to use it before any key."""
    silent = [str(p.relative_to(CONF_DIR)) for p in sorted(CONF_DIR.rglob("*.yaml"))
              if not p.read_text().lstrip().startswith("#")]
    assert silent == []
