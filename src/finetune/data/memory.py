"""The decode-memory budget: how many bytes of decoded pixels a process holds at once, over all its decoding threads.

Every decoder (training's, predict's, check's, serve's) reserves its image's estimate, read from the header, before a
pixel is decoded, and waits its turn until it fits: memory is bounded by bytes, not by a count of images or requests.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import threading

# Decoded pixels at once in a process (all its decoding threads): this share of its machine's (or cgroup's) memory.
DECODE_MEMORY_SHARE, DECODE_MEMORY_MIN, DECODE_MEMORY_MAX = 1 / 16, 256 * 2**20, 2 * 2**30
TRIM_BYTES = 64 * 2**20  # after a decode that reserved this much, freed memory goes back to the system


class DecodeBusy(Exception):
    """The decode budget stayed full for longer than the caller would wait."""


class DecodeBudget:
    """A byte-counting semaphore over decoded pixels: a decode reserves its estimate (from the header) and waits its
    turn, first come first served, until it fits; one over the whole budget runs alone. peak: most ever reserved."""

    def __init__(self, limit: int):
        self.limit, self.in_use, self.peak = max(1, int(limit)), 0, 0
        self._cond, self._turns = threading.Condition(), collections.deque()

    waiting = property(lambda self: len(self._turns), doc="Decodes waiting for room now.")

    @contextlib.contextmanager
    def reserve(self, nbytes: int, wait: float | None = None):
        """Hold min(nbytes, limit) bytes while the block runs; DecodeBusy after `wait` s without room (None: none)."""
        n, turn = max(1, min(int(nbytes), self.limit)), object()
        with self._cond:
            self._turns.append(turn)
            try:
                if not self._cond.wait_for(lambda: self._turns[0] is turn and self.in_use + n <= self.limit, wait):
                    raise DecodeBusy(f"no room for {n / 2**20:.0f} MB within {wait:g} s")
                self.in_use += n
                self.peak = max(self.peak, self.in_use)
            finally:
                self._turns.remove(turn)
                self._cond.notify_all()
        try:
            yield n
        finally:
            with self._cond:
                self.in_use -= n
                self._cond.notify_all()
            if n >= TRIM_BYTES and _malloc_trim:  # glibc keeps what big decodes free: a storm would stay resident
                _malloc_trim(0)


def default_decode_memory() -> int:
    """DECODE_MEMORY_SHARE of this machine's memory (or of its cgroup's limit, in a container), within bounds."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 16 * 2**30
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError), open(limit_file) as f:
            total = min(total, int(f.read()))  # "max" (no limit) is a ValueError
    return int(min(max(total * DECODE_MEMORY_SHARE, DECODE_MEMORY_MIN), DECODE_MEMORY_MAX))


_budget = DecodeBudget(default_decode_memory())


# glibc's malloc_trim: freed heap pages back to the system (elsewhere, nothing to do).
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if os.name == "posix" else None


def decode_budget() -> DecodeBudget:
    """The process-wide budget every decoder reserves from."""
    return _budget


def set_decode_memory(nbytes: int | None) -> DecodeBudget:
    """Give the process a new decode budget (None: the default size); decodes holding the old one finish."""
    global _budget
    _budget = DecodeBudget(nbytes or default_decode_memory())
    return _budget


if hasattr(os, "register_at_fork"):  # a loader worker forked while a thread held the budget's lock starts afresh
    os.register_at_fork(after_in_child=lambda: set_decode_memory(_budget.limit))
