"""Summarise a py-spy ``-f raw`` profile: samples per thread, the frames where they were
taken (self) and the frames they passed through (inclusive), as shares of all samples.
``python agg_pyspy.py FILE [ROWS]``."""

from __future__ import annotations

import collections
import sys


def main() -> None:
    path, rows = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 35
    total = 0
    own: collections.Counter[str] = collections.Counter()
    through: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            total += int(n)
            threads[frames[0][:50]] += int(n)
            own[frames[-1][:120]] += int(n)
            for frame in {fr[:100] for fr in frames[1:]}:
                through[frame] += int(n)
    print("samples", total)
    for title, counter in (("threads", threads), ("self", own), ("inclusive", through)):
        print(f"--- {title}")
        for k, v in counter.most_common(rows):
            print(f"{100 * v / total:5.1f} {k}")


if __name__ == "__main__":
    main()
