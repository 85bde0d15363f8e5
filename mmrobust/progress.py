"""Progress for long work: a tqdm bar on a terminal, periodic plain lines (rate, ETA) in logs and DVC."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, unit: str = "it", every_s: float = 10.0,
             enabled: bool = True, stream=None) -> Iterator[T]:
    stream = stream or sys.stderr
    if not enabled:
        yield from items
        return
    if stream.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit, file=stream)
        return
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_s or done == total:
            rate = done / max(now - start, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            print(f"{desc}: {done}/{total} {unit} ({rate:.1f} {unit}/s, ETA {eta:.0f} s)", file=stream, flush=True)
            last = now
