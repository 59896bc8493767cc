"""Summarise a py-spy ``--format raw`` (collapsed stacks) file: the top functions.

Run:  python bench/pyspy_top.py PROFILE.txt [--top 25] [--thread SUBSTRING]

Prints, per function (``name (file)``), its *self* share (samples where it is
the innermost frame) and its *inclusive* share (samples where it is anywhere
on the stack), as percentages of all samples. Used by ``bench/run.py
--py-spy DIR`` to say where the relay's time goes.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def _name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    frame = _LINE.sub(")", frame.strip())
    return re.sub(r"\(([^()]*/)?([^/()]+)\)$", r"(\2)", frame)


def summarise(path: Path, top: int = 25, thread: str | None = None) -> str:
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if thread and thread not in stack:
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return f"{path}: no samples"
    out = [f"{path.name}: {total} samples", f"{'self %':>7} {'incl %':>7}  function"]
    for name, n in own.most_common(top):
        out.append(f"{100 * n / total:7.1f} {100 * incl[name] / total:7.1f}  {name}")
    out.append("")
    out.append(f"{'incl %':>7}  function (inclusive, top {top})")
    for name, n in incl.most_common(top):
        out.append(f"{100 * n / total:7.1f}  {name}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--thread", default=None)
    args = parser.parse_args()
    print(summarise(args.profile, args.top, args.thread))


if __name__ == "__main__":
    main()
