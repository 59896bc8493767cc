"""The shape of the code: no import circle, front ends apart, modules one can read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"protocol": "backchannel.protocol", "server": "backchannel.server",
            "client": "backchannel.client"}
MAX_LINES = 600


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    out = {}
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            if "migrations" not in path.parts:
                out[_module_name(path)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        found |= {t for t in targets if t in known and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: _imports(name, path, known) for name, path in sources.items()}


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _imports_anywhere(path: Path) -> set[str]:
    """Every module named by any import in the file, including inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


#: The chat screen is these modules; the command is ``cli.py`` (and any ``cli_*.py``).
SCREEN = ("tui.py", "tui_*.py")


def _front_end(patterns: tuple[str, ...]) -> dict[str, Path]:
    found = {}
    for pattern in patterns:
        for path in (ROOT / "client").glob(pattern):
            found[path.stem] = path
    return found


def test_the_command_and_the_chat_screen_do_not_import_each_other() -> None:
    screen = _front_end(SCREEN)
    command = _front_end(("cli.py", "cli_*.py"))
    assert {"tui", "tui_commands", "tui_widgets"} <= set(screen)
    for mine, theirs in ((command, screen), (screen, command)):
        forbidden = {n for stem in theirs for n in (f".{stem}", f"backchannel.client.{stem}")}
        for stem, path in mine.items():
            assert not forbidden & _imports_anywhere(path), stem


def test_protocol_imports_nothing_from_the_relay_or_the_client() -> None:
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("backchannel.protocol"):
            assert all(d.startswith("backchannel.protocol") for d in deps), name


def test_no_module_is_too_long_to_read() -> None:
    long = {
        name: n
        for name, path in _sources().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
        and not name.startswith("backchannel.protocol")
    }
    assert long == {}
