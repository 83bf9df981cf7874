"""Progress for long data jobs (converters, the synthetic generator) that keeps logs readable.

On a terminal: a tqdm bar. Anywhere else (a log file, a pipe, a SLURM job): tqdm would write
one carriage-return update after another, which a log shows as hundreds of lines or one
unreadable line. There the loop prints instead a plain line at most every
:data:`LOG_INTERVAL_S` seconds (``ct-ich: 12/130 patients, 2m05s``); the caller prints the
one-line summary at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

# A log line at most this often when stderr is not a terminal.
LOG_INTERVAL_S = 60.0


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress(
    items: Iterable[T],
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    enabled: bool = True,
    interval_s: float | None = None,
) -> Iterator[T]:
    """Iterate ``items`` with a bar on a terminal and sparse plain lines elsewhere.

    Args:
        items: what to iterate.
        desc: the label, e.g. ``ct-ich``.
        unit: one item, e.g. ``patient``.
        total: the number of items, when ``items`` has no ``len``.
        enabled: False: no output at all.
        interval_s: seconds between log lines off a terminal; default :data:`LOG_INTERVAL_S`.
    """
    if not enabled or sys.stderr is None:  # None: no console at all (pythonw)
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, unit=unit, total=total)
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    every = LOG_INTERVAL_S if interval_s is None else interval_s
    start = last = time.monotonic()
    for n, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every:
            last = now
            of = f"/{total}" if total is not None else ""
            print(f"{desc}: {n}{of} {unit}s, {_elapsed(now - start)}", file=sys.stderr, flush=True)
