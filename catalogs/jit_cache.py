"""hats' numba kernels compiled once per machine, not once per process.

hats (0.11) aligns HEALPix pixel trees with numba functions declared without `cache=True`, so every process
that plans a margin cache (each merge) or cross-matches with lsdb compiles them again: 7.5 s on a quiet core of
this 2-core machine and about 20 s under load, against 0.7 s loaded from numba's on-disk cache (a merge of a
two-field run took 22 s in all). `cache_hats_kernels` replaces those functions in their modules by the same
Python functions compiled with `cache=True` (numba writes the cache beside hats' sources, or in its user-wide
cache directory where that is read-only). Written here because hats offers no switch for it; the functions and
their results are hats' own, unchanged. Without numba's dispatcher type, or with a hats that renamed its
modules, nothing is replaced and hats compiles as before.
"""
from __future__ import annotations

import importlib
import threading

MODULES = ("hats.pixel_tree.pixel_alignment", "hats.pixel_tree.moc_filter")
_lock = threading.Lock()
_done = False


def cache_hats_kernels() -> int:
    """Swap hats' uncached numba functions for cached compilations of the same code (once per process);
    returns how many were swapped (0 on later calls)."""
    global _done
    with _lock:
        if _done:
            return 0
        _done = True
        try:
            import numba
            from numba.core.registry import CPUDispatcher
        except ImportError:
            return 0
        n = 0
        for name in MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            for attr, obj in list(vars(mod).items()):
                if isinstance(obj, CPUDispatcher) and not obj.targetoptions.get("cache"):
                    setattr(mod, attr, numba.njit(cache=True)(obj.py_func))
                    n += 1
        return n
