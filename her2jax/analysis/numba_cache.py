"""numba's on-disk cache for the kernels of umap and shap (``~/.cache/her2jax/numba``).

umap and shap compile numba kernels on first use in every process, and most of them are
declared without ``cache=True``, so numba compiled them again in each process: ~9 s for a
UMAP of a few dozen cases on 2 CPU cores. :func:`import_cached` imports such a package with
numba's cache directory set and turns the cache on for each of its module-level kernels: the
first run on a machine compiles and writes them, later runs load the machine code (that UMAP:
9 s -> 0.1 s; ``--mode=analyze`` of a test workdir: 32 s -> 20 s). numba keys an entry on
the kernel's source file (path, size, modification time) and on the CPU, so an upgraded
package or another machine compiles afresh. ``NUMBA_CACHE_DIR``, when set, wins.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

CACHE_DIR = Path("~/.cache/her2jax/numba")
# Kernels left uncached: they take shap's link function (itself a kernel) as an argument,
# which numba keys by an identity that differs in every process, so each run would add an
# entry to the cache and none would ever be read.
UNCACHEABLE = frozenset({"shap.utils._masked_model._build_fixed_single_output",
                         "shap.utils._masked_model._build_fixed_multi_output"})
_DONE: set[str] = set()   # modules whose kernels were given the cache


def import_cached(name: str) -> ModuleType:
    """Imports package ``name`` with its module-level numba kernels cached on disk.

    Args:
      name: the package to import (``"umap"``, ``"shap"``). (pynndescent, which umap calls,
        declares its own kernels ``cache=True``.)

    Returns:
      The imported package.
    """
    cache = os.environ.setdefault("NUMBA_CACHE_DIR", str(CACHE_DIR.expanduser()))
    numba = sys.modules.get("numba")
    if numba is not None and not numba.config.CACHE_DIR:
        # numba reads the variable when first imported (by shap or umap); tell it directly.
        numba.config.CACHE_DIR = cache
    package = importlib.import_module(name)
    from numba.core.dispatcher import Dispatcher

    for module_name, module in list(sys.modules.items()):
        if module is None or module_name in _DONE or module_name.partition(".")[0] != name:
            continue
        _DONE.add(module_name)
        for value in list(vars(module).values()):
            if isinstance(value, Dispatcher) and _name(value) not in UNCACHEABLE:
                value.enable_caching()   # a no-op in effect for one declared cache=True
    return package


def _name(kernel) -> str:
    return f"{kernel.py_func.__module__}.{kernel.py_func.__qualname__}"
