"""Host memory during calibration: freed memory goes back to the OS; large fits take turns.

glibc's malloc keeps freed blocks of up to 32 MiB in its heaps once a freed mmapped block has raised its
dynamic mmap threshold, which the 4 MiB Gram blocks do. Measured on the full SD1.5 UNet (W4A8): after the
weight fit the live tensors were 3.9 GB but the process held 7.5 GB, and the peak during the fit was 9.0 GB.
``malloc_trim(0)`` returns the free pages of every heap (it also releases pages inside a heap, not only
at its top). Elsewhere (other C libraries, Windows, macOS) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading
from contextlib import contextmanager

_LOCK = threading.Lock()
_TRIM = None


def _malloc_trim():
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
                _TRIM.argtypes, _TRIM.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                _TRIM = False
    return _TRIM


def release_freed_memory() -> bool:
    """Return freed heap memory to the OS (glibc); True when something could be tried. Cheap (~0.1 ms idle)."""
    trim = _malloc_trim()
    if not trim:
        return False
    with _LOCK:
        trim(0)
    return True


class MemoryGate:
    """Lets jobs run together only while their estimated transient bytes fit ``budget``.

    The weight fit runs layers in a thread pool; two of SD1.5's largest layers fitted at once hold an
    estimated ~1.3 GB of temporaries (``fitting.fit_transient_bytes``: stacked clip candidates, their codes,
    dequantized copies). Through the gate small layers still overlap while large ones take turns. A job
    larger than the budget runs alone. (Its effect on the measured peak was not isolated from the trim's.)
    """

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int):
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.budget)
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()
