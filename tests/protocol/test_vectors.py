"""The code must reproduce every frozen known-answer vector file exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "vectors"))

import generate

NAMES = generate.generator_names()


def test_there_are_vector_files() -> None:
    assert NAMES, "no gen_*.py generators found"
    for name in NAMES:
        assert (generate.HERE / f"{name}.json").exists(), f"{name}.json was never generated"


@pytest.mark.parametrize("name", NAMES)
def test_vectors_reproduce(name: str) -> None:
    assert generate.run_generator(name) == generate.load(name)
