"""The layout by process role holds: imports point down, and no module imports itself in a circle.

Every ``import`` and ``from … import`` of the project's packages is read from
the source (also those inside functions), so a late import can't hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "parserd", "dtprobed")

#: (importer prefix, imported prefix, why it is forbidden)
FORBIDDEN = (
    ("common", "dtprobed", "common/ is shared by every process and does no I/O"),
    ("common", "parserd", "common/ is shared by every process"),
    ("parserd", "dtprobed", "the sandboxed parser uses only common/"),
    ("dtprobed.stash", "dtprobed.daemon", "the writer process never imports the daemon"),
    ("dtprobed.stash", "dtprobed.device", "the writer process never imports the device"),
    ("dtprobed.stash", "dtprobed.children", "the writer process never imports the daemon's side"),
    ("dtprobed.stash", "dtprobed.cli", "the writer process never imports the tools"),
    ("dtprobed.cli", "dtprobed.stash.store", "the read-only tools never import the writer"),
    ("dtprobed.cli", "dtprobed.stash.writer", "the read-only tools never import the writer"),
    ("dtprobed.cli", "dtprobed.daemon", "the tools never import the daemon"),
    ("dtprobed.device", "dtprobed.daemon", "the device layer sits below the daemon"),
    ("dtprobed.device", "dtprobed.children", "the device layer sits below the daemon"),
    ("dtprobed.device", "dtprobed.stash", "the device layer sits below the daemon"),
    ("dtprobed.children", "dtprobed.daemon", "the children's clients sit below the daemon"),
    ("dtprobed.children", "dtprobed.device", "the children's clients know nothing of the device"),
    ("dtprobed.oslib", "dtprobed.", "oslib is the bottom layer of dtprobed"),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import names (the longest existing prefix), or None."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: relative import"
            base = node.module or ""
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                out.add(target)
    return out


GRAPH = {module: _imports(module) for module in MODULES}


def test_the_layout_by_process_role_exists() -> None:
    for package in (
        "dtprobed.daemon",
        "dtprobed.device",
        "dtprobed.children",
        "dtprobed.stash",
        "dtprobed.cli",
    ):
        assert package in MODULES, f"{package} is missing"
    # one flat module per role no more: only the entry point stays at the top
    top = {p.name for p in MODULES.values() if p.parent == REPO / "dtprobed"}
    assert top == {"__init__.py", "__main__.py"}


def _under(module: str, prefix: str) -> bool:
    if prefix.endswith("."):
        return module.startswith(prefix) and not module.startswith("dtprobed.oslib")
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize(("importer", "imported", "why"), FORBIDDEN)
def test_no_forbidden_import(importer: str, imported: str, why: str) -> None:
    bad = sorted(
        f"{src} imports {dst}"
        for src, targets in GRAPH.items()
        if _under(src, importer)
        for dst in targets
        if _under(dst, imported)
    )
    assert not bad, f"{why}: " + "; ".join(bad)


def test_no_import_cycle() -> None:
    # Iterative DFS with colours; a grey node reached again closes a cycle.
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(GRAPH, white)
    for root in sorted(GRAPH):
        if colour[root] != white:
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(GRAPH[root]))]
        path = [root]
        colour[root] = grey
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = black
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if colour[nxt] == grey:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if colour[nxt] == white:
                colour[nxt] = grey
                path.append(nxt)
                stack.append((nxt, sorted(GRAPH[nxt])))


def test_the_checker_sees_a_cycle_and_a_late_import(tmp_path: Path) -> None:
    """The test above can fail: a cycle made only by a function-level import is found."""
    source = "def f() -> None:\n    from dtprobed.device.opener import open_device\n"
    tree = ast.parse(source)
    seen = {
        _resolve(f"{n.module}.{a.name}")
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
        for a in n.names
    }
    assert seen == {"dtprobed.device.opener"}
    assert "dtprobed.device.cuse" in GRAPH["dtprobed.device.opener"]
