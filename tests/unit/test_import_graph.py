"""kombu_rpc's modules depend on each other one way: contrib -> core -> transports.

The graph is read from the source with ``ast``: every ``import`` of a kombu_rpc module,
at module level, in a function or under ``if TYPE_CHECKING:``, is an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kombu_rpc

pytestmark = pytest.mark.timeout(30)

PACKAGE = Path(kombu_rpc.__file__).parent
#: Layers outside the core, which the core never imports.
OUTER = ("kombu_rpc.contrib", "kombu_rpc.testing", "kombu_rpc._cli", "kombu_rpc.__main__")


def module_name(path: Path) -> str:
    parts = ["kombu_rpc", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The kombu_rpc modules that module ``name`` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            # ``from . import protocol`` imports a module; ``from .x import name``, module x
            targets = [
                f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import a.b.c: the deepest known module
                target = target.rpartition(".")[0]
            if target.startswith("kombu_rpc") and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def is_outer(name: str) -> bool:
    return any(name == outer or name.startswith(outer + ".") for outer in OUTER)


def test_the_graph_sees_every_kind_of_import() -> None:
    edges = graph()
    assert "kombu_rpc.proxy" in edges["kombu_rpc.aio"]  # module level, relative
    assert "kombu_rpc.server" in edges["kombu_rpc._cli"]  # in a function, and TYPE_CHECKING
    assert "kombu_rpc._transports.memory" in edges["kombu_rpc.testing"]  # from .._transports import memory
    assert "kombu_rpc.protocol" in edges["kombu_rpc.codecs"]  # from . import protocol
    assert "kombu_rpc.registry" in edges["kombu_rpc.testing.pytest_plugin"]  # absolute


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for target in sorted(edges[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(edges):
        visit(name, [])


def test_only_contrib_imports_contrib() -> None:
    offenders = {
        (name, target)
        for name, targets in graph().items()
        for target in targets
        if target.startswith("kombu_rpc.contrib") and not name.startswith("kombu_rpc.contrib")
    }
    assert not offenders


def test_the_core_never_imports_an_outer_layer() -> None:
    offenders = {
        (name, target)
        for name, targets in graph().items()
        if not is_outer(name) and name != "kombu_rpc"
        for target in targets
        if is_outer(target)
    }
    assert not offenders


def test_the_core_reaches_transports_through_their_seam_only() -> None:
    offenders = {
        (name, target)
        for name, targets in graph().items()
        if not name.startswith("kombu_rpc._transports") and not is_outer(name)
        for target in targets
        if target.startswith("kombu_rpc._transports.")
    }
    assert not offenders


def test_transports_import_nothing_of_the_core_but_its_errors() -> None:
    offenders = {
        (name, target)
        for name, targets in graph().items()
        if name.startswith("kombu_rpc._transports")
        for target in targets
        if not target.startswith("kombu_rpc._transports") and target != "kombu_rpc.errors"
    }
    assert not offenders
