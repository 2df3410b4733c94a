"""Flush denormal floats to zero while a quantized model runs, and put the flags back afterwards.

Denormals (|x| < 1.2e-38 in float32; SiLU / GELU / softmax of large negative inputs make them) cost
x86 CPUs a microcode assist per element: the issue-12 measurement saw whole UNet steps 5x slower.
``torch.set_flush_denormal`` fixes that, but it sets the FTZ/DAZ bits of the *calling thread only*,
and PyTorch's intra-op OpenMP workers keep the bits they had when they were created. So each switch
is done on the calling thread and, through the OpenMP runtime's ``GOMP_parallel`` entry point (libgomp;
LLVM's libomp and Intel's iomp5 export it too), on every thread of its pool. Each thread records its
own previous state (there is no getter: a one-element multiply shows it) and gets exactly that back,
so nothing else in the process changes. Where no such OpenMP runtime is found (e.g. Windows' vcomp),
only the calling thread is switched; ``pool_reached()`` says which.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading

import torch

_TINY = 1e-39  # a float32 denormal


def thread_flushes() -> bool:
    """Whether denormals are flushed on the calling thread (FTZ or DAZ set): a one-element CPU multiply
    runs on this thread, and with either bit set a denormal times one gives zero."""
    return float(torch.tensor([_TINY]).mul_(1.0)[0]) == 0.0


@functools.lru_cache(maxsize=None)
def _gomp_parallel():
    """``GOMP_parallel`` of the OpenMP runtime torch already loaded (same library, so the same pool), or None."""
    if torch.__config__.parallel_info().find("OpenMP") < 0:
        return None
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    candidates = sorted(glob.glob(os.path.join(lib_dir, "libgomp*.so*"))) + [
        "libgomp.so.1", "libiomp5.so", "libomp.so", "libgomp.1.dylib", "libomp.dylib"]
    for name in candidates:
        try:
            lib = ctypes.CDLL(name, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
            fn = lib.GOMP_parallel
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        fn.restype = None
        return fn
    return None


_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _on_pool(action, threads: int) -> None:
    """Run ``action()`` once on each of ``threads`` threads of the calling thread's OpenMP team (the caller
    included; libgomp hands a team of the same size the same pool threads)."""
    gomp = _gomp_parallel()
    if gomp is None:
        action()
        return
    errors: list = []

    def body(_):
        try:
            action()
        except BaseException as exc:  # an exception must not unwind through C
            errors.append(exc)
    callback = _CALLBACK(body)
    gomp(ctypes.cast(callback, ctypes.c_void_p), None, threads, 0)
    if errors:
        raise errors[0]


def pool_reached() -> bool:
    """Whether switches reach the intra-op worker threads too (an OpenMP runtime with GOMP_parallel)."""
    return _gomp_parallel() is not None


class FlushDenormals:
    """``enter()`` flushes denormals on the calling thread and its intra-op pool; ``exit()`` gives each of
    those threads its own previous setting back. A second ``enter()`` before ``exit()`` does nothing, so a
    call that raised before its ``exit()`` is made good by the next call's ``exit()``."""

    def __init__(self) -> None:
        self._threads = 0  # team size switched at enter(); 0 = not entered
        self._previous: dict = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self._threads > 0

    def _set_and_remember(self) -> None:
        was = thread_flushes()
        with self._lock:
            self._previous.setdefault(threading.get_ident(), was)
        if not was:
            torch.set_flush_denormal(True)

    def _restore(self) -> None:
        with self._lock:
            was = self._previous.pop(threading.get_ident(), None)
        if was is False:
            torch.set_flush_denormal(False)

    def enter(self) -> None:
        if self._threads == 0:
            self._threads = torch.get_num_threads()
            _on_pool(self._set_and_remember, self._threads)

    def exit(self) -> None:
        if self._threads:
            _on_pool(self._restore, self._threads)
            self._threads = 0
            self._previous.clear()

    def __enter__(self):
        self.enter()
        return self

    def __exit__(self, *exc) -> None:
        self.exit()
