"""Timing shared by the benches in this folder: the header, interleaved rounds, median and spread, the closing table.

Every bench compares sides (ours and a named peer, or two settings of ours) on a machine that may
be shared with other work. So each times its sides in interleaved rounds: a round calls every side
once, the order rotated from round to round (A B, B A, A B, ...), and a busy moment of the machine
hits all sides alike. Per side it reports the median over the rounds with the spread (min..max),
and the ratio of the medians.
"""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


def machine() -> str:
    """Cores this process may run on and the load average: what a timing on this host depends on."""
    load = os.getloadavg()
    return (f"{len(os.sched_getaffinity(0))} core(s) available to this process (of {os.cpu_count()}), "
            f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)")


def header(title: str, settings, **more) -> None:
    """Print what the bench compares, the exact command line, its settings (an argparse Namespace
    or a dict, plus ``more``) and the machine."""
    items = {**(settings if isinstance(settings, dict) else vars(settings)), **more}
    print(title)
    print(f"command: {shlex.join(sys.orig_argv)}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in items.items()))
    print(f"machine: {machine()}", flush=True)


@dataclass
class Rounds:
    """Seconds per call of each side, one entry per round: wall time and this process's CPU time
    (the latter leaves out the time a single-threaded call waited for a core held by another
    process; it does not see child processes)."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def interleaved(calls: dict[str, Callable[[], object]], rounds: int) -> Rounds:
    """Call every side once per round, the order rotated each round; no warm-up (do it before)."""
    names = list(calls)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t, c = time.perf_counter(), time.process_time()
            calls[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return Rounds(wall, cpu)


def spread(values: Iterable[float], fmt: str = "{:.3f}") -> str:
    """'median (min..max)' of ``values`` (seconds, or rates made from them)."""
    v = list(values)
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}..{fmt.format(max(v))})"


def ratio(slow: list[float], fast: list[float]) -> float:
    """median(slow) / median(fast): how many times faster ``fast`` is (> 1: faster)."""
    return statistics.median(slow) / statistics.median(fast)


def table(title: str, head: list[str], rows: list[list], left: tuple[int, ...] = (0,)) -> None:
    """The closing table of figures: ``head`` and ``rows`` of cells (str() of each); the columns
    numbered in ``left`` left-aligned (by default the first), the others right-aligned."""
    cells = [[str(c) for c in r] for r in [head, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    print(f"\n{title}")
    for r in cells:
        print("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
