"""Huge pages for runtime weights: only memory mapped by the build is touched, and it is collapsed."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest

from kiln.engine import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _can_collapse() -> bool:
    """Linux 6.1+ (MADV_COLLAPSE) with transparent huge pages not switched off."""
    if not sys.platform.startswith("linux") or not THP.is_file() or "[never]" in THP.read_text():
        return False
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 1)


def _huge_kb(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == "AnonHugePages:":
            return int(fields[1])
    return 0


def test_new_mappings_grown_ends_and_the_heap_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hugepages, "_collapsed_to", {})
    heap, old, grown, new = 0x1000, 0x10000, 0x30000, 0x60000
    before = {heap: (0x5000, True), old: (0x20000, False), grown: (0x40000, False)}
    after = {heap: (0x9000, True), old: (0x20000, False), grown: (0x48000, False), new: (0x70000, False)}
    # the first time, the whole heap (freed memory the build reused is in it); untouched mappings not at all
    assert sorted(hugepages._ranges(before, after)) == [(heap, 0x9000), (0x40000, 0x48000), (new, 0x70000)]
    hugepages._collapsed_to[heap] = 0x9000
    after[heap] = (0xC000, True)
    assert (0x9000, 0xC000) in hugepages._ranges(before, after)  # later, only past what was collapsed


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_HUGEPAGES", "0")
    assert hugepages.with_huge_pages(lambda: "built") == ("built", 0)


@pytest.mark.skipif(not _can_collapse(), reason="needs Linux 6.1+ with transparent huge pages enabled")
def test_memory_mapped_by_the_build_gets_huge_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_HUGEPAGES", raising=False)
    size = 32 << 20

    def build() -> mmap.mmap:
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        area.write(b"\1" * size)  # touched, so it is backed by small pages before the collapse
        return area

    area, collapsed = hugepages.with_huge_pages(build)
    address = ctypes.addressof(ctypes.c_char.from_buffer(area))
    assert collapsed >= size - 2 * hugepages.HUGE  # every whole 2 MiB page inside the mapping
    assert _huge_kb(address) >= (size - 2 * hugepages.HUGE) >> 10
    assert area[:4] == b"\1\1\1\1" and area[size - 1 : size] == b"\1"  # contents kept
    area.close()


def test_without_proc_the_build_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_HUGEPAGES", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")

    def no_proc() -> dict[int, tuple[int, bool]]:
        raise FileNotFoundError("/proc/self/maps")

    monkeypatch.setattr(hugepages, "_anonymous_regions", no_proc)
    assert hugepages.with_huge_pages(lambda: "built") == ("built", 0)
