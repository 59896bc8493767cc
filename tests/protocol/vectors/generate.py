"""Regenerate the known-answer vector files beside this script.

Each ``gen_<name>.py`` module here defines ``generate() -> dict`` built only
from fixed seeds (and, for ML-KEM, from the fixed key material stored in
``mlkem_fixture.json``, because pqcrypto has no seeded key generation).
This script writes ``<name>.json``; ``tests/protocol/test_vectors.py`` checks
that the code still reproduces every file exactly.

Run:  python tests/protocol/vectors/generate.py [NAME ...]   (only when a format changes
on purpose; the diff of the JSON files is then part of the review).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def to_json(value: Any) -> Any:
    """Bytes become ``{"hex": ...}`` so the files stay readable and diffable."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"hex"}:
            return bytes.fromhex(value["hex"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def generator_names() -> list[str]:
    return sorted(p.stem[len("gen_") :] for p in HERE.glob("gen_*.py"))


def run_generator(name: str) -> Any:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    tests_dir = str(HERE.parent.parent.parent)
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    module = importlib.import_module(f"gen_{name}")
    return to_json(module.generate())


def load(name: str) -> Any:
    return json.loads((HERE / f"{name}.json").read_text())


def mlkem_fixture(index: int) -> dict[str, bytes]:
    """Fixed ML-KEM-768 key pair ``index`` with one ciphertext and its shared secret."""
    data = from_json(json.loads((HERE / "mlkem_fixture.json").read_text())["keys"])
    item: dict[str, bytes] = data[index]
    return item


def main() -> None:
    names = sys.argv[1:] or generator_names()
    for name in names:
        data = run_generator(name)
        (HERE / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {name}.json")


if __name__ == "__main__":
    main()
