"""protocol/ is sans-I/O: it imports nothing from the network, disk, database or asyncio."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol"
MODULES = sorted(p for p in PROTOCOL.glob("*.py"))

# Standard-library modules a pure protocol may use. Anything else is refused,
# so a new dependency on I/O has to be argued for here, in review.
ALLOWED_STDLIB = {
    "__future__",
    "base64",
    "bisect",
    "collections",
    "collections.abc",
    "copy",
    "dataclasses",
    "enum",
    "functools",
    "hmac",
    "itertools",
    "math",
    "re",
    "string",
    "typing",
    "unicodedata",
    "urllib.parse",
}
CRYPTO_ONLY_IN = {"primitives.py": {"nacl", "pqcrypto"}, "encoding.py": {"cbor2"}}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_imports_are_pure(path: Path) -> None:
    extra_roots = CRYPTO_ONLY_IN.get(path.name, set())
    for name in imported_modules(path):
        root = name.split(".")[0]
        assert name in ALLOWED_STDLIB or root in extra_roots, (
            f"{path.name} imports {name!r}; protocol/ must stay sans-I/O and only "
            "primitives.py may touch the crypto libraries"
        )


def test_importing_everything_pulls_in_no_io_modules() -> None:
    names = [f"backchannel.protocol.{p.stem}" for p in MODULES if p.stem != "__init__"]
    code = (
        "import sys\n"
        + "".join(f"import {n}\n" for n in names)
        + "bad = [m for m in ('asyncio', 'socket', 'sqlite3', 'sqlalchemy', 'http.client',"
        " 'urllib.request', 'websockets', 'fastapi', 'httpx', 'ssl') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"protocol import pulled in I/O modules: {out}"
