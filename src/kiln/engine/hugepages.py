"""Back a runtime's weights with 2 MiB pages (Linux transparent huge pages), best effort.

Batch-1 decode streams every weight once per token. With 4 KiB pages that is ~20,000 pages for an
86 MB int4 model and a TLB miss on most of them; with 2 MiB pages, ~40. Where the kernel leaves huge
pages to programs that ask (`madvise` mode, the common default), ONNX Runtime's own allocations
(its prepacked MatMulNBits weights) never get them, since it never asks. So kiln asks for it: after
a session is built, the anonymous memory it mapped and malloc's heap are marked MADV_HUGEPAGE and
collapsed in place with MADV_COLLAPSE (Linux 6.1+): about 1 s for the first session of a process
(its whole heap), less for later ones. Measured on the default model's int4 export, 2 cores:
batch-1 decode +2.7% (median of 14 process pairs, on vs off; 11 of them faster). On other systems,
or where the kernel refuses, nothing changes. KILN_HUGEPAGES=0 turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from typing import TypeVar

from kiln import settings

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
HUGE = 2 << 20
MIN_BYTES = 4 << 20  # smaller mappings hold no weights worth it
T = TypeVar("T")


_collapsed_to: dict[int, int] = {}  # mapping start -> end of what an earlier call collapsed there


def _anonymous_regions() -> dict[int, tuple[int, bool]]:
    """start -> (end, is malloc's heap) of the process's private writable anonymous mappings."""
    regions = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            heap = len(fields) > 5 and fields[5] == "[heap]"
            if (len(fields) > 5 and not heap) or not fields[1].startswith("rw"):  # a file, [stack], ...
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            regions[start] = (end, heap)
    return regions


def _ranges(before: dict[int, tuple[int, bool]], after: dict[int, tuple[int, bool]]) -> list[tuple[int, int]]:
    """What to collapse after a build: its new mappings, and malloc's heap, where the runtime's many
    small prepacked buffers land, often in space freed before the build; the heap only from where an
    earlier call stopped (so the first session pays for the whole heap once, later ones for its growth)."""
    out = []
    for start, (end, heap) in after.items():
        if heap or before.get(start) != (end, heap):
            grown_from = before[start][0] if start in before and not heap else start  # an old mapping: its new end
            first = _collapsed_to.get(start, grown_from)
            if first < end:
                out.append((first, end))
    return out


def _collapse(ranges: list[tuple[int, int]], libc: ctypes.CDLL) -> int:
    done = 0
    for start, end in ranges:
        first, last = -(-start // HUGE) * HUGE, end // HUGE * HUGE  # whole huge pages inside the range
        if last - first < MIN_BYTES:
            continue
        address, size = ctypes.c_void_p(first), ctypes.c_size_t(last - first)
        if libc.madvise(address, size, MADV_HUGEPAGE) == 0 and libc.madvise(address, size, MADV_COLLAPSE) == 0:
            done += last - first
            _collapsed_to[start] = end
    return done


def with_huge_pages(build: Callable[[], T]) -> tuple[T, int]:
    """build(), then the anonymous memory it mapped backed by huge pages; (result, bytes collapsed)."""
    if not sys.platform.startswith("linux") or not settings.huge_pages():
        return build(), 0
    try:
        before = _anonymous_regions()
    except OSError:  # no /proc: the session works as it is
        return build(), 0
    result = build()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return result, _collapse(_ranges(before, _anonymous_regions()), libc)
    except OSError:  # no libc to call: the session works as it is
        return result, 0
