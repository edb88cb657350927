"""Read-path tuning: the readahead and prefetch defaults of `FeatureStore`, and the prefetch
itself (one posix_fadvise WILLNEED per value of a batch).

Why these defaults is in `FeatureStore`'s docstring and docs/BENCHMARKS.md ("Read path").

Example:
    >>> from featstore.store.prefetch import PREFETCH_DEFAULT, READAHEAD_DEFAULT
    >>> READAHEAD_DEFAULT, PREFETCH_DEFAULT
    (True, False)
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from featstore.store.environments import OpenEnv

__all__ = ["READAHEAD_DEFAULT", "PREFETCH_DEFAULT", "prefetch"]

# Read-path defaults, chosen by benchmarks/read_bench.py (docs/BENCHMARKS.md, "Read path").
READAHEAD_DEFAULT = True
PREFETCH_DEFAULT = False

_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


def prefetch(rec: OpenEnv, values: Sequence[memoryview]) -> None:
    """Ask the kernel to read exactly the pages of `values` now, asynchronously.

    One posix_fadvise(WILLNEED) per value queues all of a batch's reads at once (the disk sees
    them in parallel) and reads no page outside them; the copy then finds them in the page
    cache. On cached pages it costs a few microseconds per value.
    """
    if _WILLNEED is None or rec.map_addr is None:
        return
    for v in values:
        if len(v) < 8192:  # a page or two: the fault reads it anyway
            continue
        offset = np.frombuffer(v, dtype=np.uint8).ctypes.data - rec.map_addr
        if not 0 <= offset < rec.map_end - rec.map_addr:  # not in the map we know: skip, never guess
            continue
        start = offset & ~4095
        os.posix_fadvise(rec.fd, start, offset + len(v) - start, _WILLNEED)

