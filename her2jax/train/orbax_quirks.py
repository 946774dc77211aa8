"""Workarounds for orbax-checkpoint and tensorstore, in one room, each labelled with the
version it targets (orbax-checkpoint 0.12.8, tensorstore 0.1.86 as of 2026-12-05).

* :func:`install`: process-wide, backend-free: quiets the per-thread tracebacks, abandoned
  asyncio tasks and "Event loop is closed" reports of a save that failed for an operating
  system reason (``Checkpoints`` raises that failure once, as one line). Called by every
  console script before it runs, by the test conftest, and (idempotently) by ``Checkpoints``.
* :func:`whole_shards_on_cpu`: on the CPU backend, replicated arrays are saved from one whole
  shard instead of orbax's per-replica slices (seconds of compilation per run).
* :func:`join_background_threads`: after a failed save, waits for orbax's other writes.
* :func:`os_reason`: the OS reason inside orbax's and tensorstore's error messages.

When orbax changes, these are the places to check first.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import re
import sys
import threading
import time
import traceback
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

TMP_SUFFIX = ".orbax-checkpoint-tmp"   # orbax's name for a step still being written
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def os_reason(error: BaseException | None) -> str | None:
    """(orbax-checkpoint 0.12.8, tensorstore 0.1.86) The operating system's reason when
    ``error`` (or an exception it was raised from) is a
    failed file operation, e.g. "No space left on device"; None for any other error.

    orbax passes tensorstore's failures on as ``ValueError("RESOURCE_EXHAUSTED: ... Failed to
    write ... [os_error_code='28']")``, so the code is read from the message as well as from
    an ``OSError``'s ``errno``.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.strerror or os.strerror(error.errno)
        match = _OS_ERROR_CODE.search(str(error))
        if match:
            return os.strerror(int(match.group(1)))
        error = error.__cause__ or error.__context__
    return None


class _QuietWriteFailures(std_logging.Filter):
    """Drops the ERROR records of a save that failed for an operating-system reason: orbax
    logs it with its traceback once per background thread, and asyncio once per abandoned
    write task, before the failure reaches the caller. ``Checkpoints`` raises it as one
    ``Her2jaxError`` line instead, which the command line prints; orbax's other errors
    still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None or os_reason(error) is None:
            return True
        frames = [record.pathname] + [frame.filename for frame in
                                      traceback.extract_tb(error.__traceback__)]
        # asyncio's records of abandoned writes carry no orbax frame, but name the folder.
        return not (any(f"{os.sep}orbax{os.sep}" in name for name in frames)
                    or TMP_SUFFIX in str(error))


_QUIET_WRITE_FAILURES = _QuietWriteFailures()


_WHOLE_SHARDS: Any = None   # the jax.Array handler _whole_shards_on_cpu registered


def whole_shards_on_cpu() -> None:
    """On the CPU backend, saves a replicated array from one whole shard, not in slices.
    (Targets orbax-checkpoint 0.12.8: ``ArrayHandler(use_replica_parallel=...)`` and the
    ``array_metadata_store`` module are orbax internals.)

    Not part of :func:`install`: it asks JAX for its backend, which would initialise it, and a
    multi-process run must call ``jax.distributed.initialize`` first; ``Checkpoints`` calls it
    once the run's devices exist.

    orbax's default (everywhere but where ``JAX_PLATFORMS`` names a GPU) is replica-parallel:
    every replicated array is cut into one slice per replica, each copied to the host by its
    own device. On CPU a shard already is host memory, so the slices save nothing, and each
    one is a small XLA program per array shape and device, compiled at the first save and
    dispatched at every save: ~3 s of a 160-step run of the tiny ViT on 8 CPU devices (2
    cores), also with JAX's persistent compilation cache. Only the chunking of the stored
    arrays differs, which orbax reads back from the files: a checkpoint written either way
    restores on any topology. GPU and TPU runs keep orbax's default. Process-wide (the
    handler of ``jax.Array`` in orbax's registry: ``StandardCheckpointHandler`` takes no
    registry of its own); idempotent.
    """
    global _WHOLE_SHARDS
    if jax.default_backend() != "cpu":
        return
    if _WHOLE_SHARDS is None:
        from orbax.checkpoint._src.metadata import array_metadata_store

        # As orbax's default handler, with its per-process array metadata, but unsliced.
        _WHOLE_SHARDS = ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False, array_metadata_store=array_metadata_store.Store())
    if ocp.type_handlers.get_type_handler(jax.Array) is not _WHOLE_SHARDS:
        # orbax logs the override as a warning, which the command line would print.
        notice = _DropMessage("Type handler registry type")
        std_logging.getLogger("absl").addFilter(notice)
        try:
            ocp.type_handlers.register_type_handler(jax.Array, _WHOLE_SHARDS, override=True)
        finally:
            std_logging.getLogger("absl").removeFilter(notice)


class _DropMessage(std_logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def install() -> None:
    """Silences what orbax and tensorstore print about the writes of a failed save.
    (Targets orbax-checkpoint 0.12.8 and tensorstore 0.1.86: the log records, the asyncio
    task warnings and the "Event loop is closed" unraisable errors below are theirs.)

    Called by every console script before it runs (``her2jax.cli.run``), by the tests'
    conftest, and by ``Checkpoints`` for library callers.

    When one write of a save fails (a full disk fails them all), orbax raises at once and
    abandons the others: it logs the failure with a traceback once per background thread,
    asyncio logs each abandoned task, tensorstore reports each write ending after orbax
    closed its event loop (``RuntimeError: Event loop is closed``, through
    ``sys.unraisablehook`` from its own threads, up to hundreds of times), and the
    abandoned coroutines warn at exit that they were never awaited. ``Checkpoints`` raises
    the failure once, as a ``Her2jaxError``; nothing can act on the rest. Process-wide, and
    narrow: a record or error is dropped only if it is one of these (other orbax errors and
    any error of the main thread still show). Idempotent.
    """
    for name in ("absl", "asyncio"):   # a no-op after the first time: the same object
        std_logging.getLogger(name).addFilter(_QUIET_WRITE_FAILURES)
    warnings.filterwarnings("ignore", category=RuntimeWarning, message=(   # deduplicated
        r"coroutine 'async_serialize_from_host\.<locals>\.\w+' was never awaited"))
    previous = sys.unraisablehook
    if getattr(previous, "her2jax_quiet", False):
        return   # installed (again if something, e.g. pytest, replaced it since)

    def unraisablehook(unraisable):
        if (isinstance(unraisable.exc_value, RuntimeError) and unraisable.object is None
                and str(unraisable.exc_value) == "Event loop is closed"
                and threading.current_thread() is not threading.main_thread()):
            return
        previous(unraisable)

    unraisablehook.her2jax_quiet = True
    sys.unraisablehook = unraisablehook


def join_background_threads(timeout_s: float = 60.0) -> None:
    """(orbax-checkpoint 0.12.8) Waits (a bounded time) for orbax's background threads: after one write of a save
    fails, orbax raises at once while its other writes of that save are still running, and
    those would otherwise write into the step's folder after it is removed, or fail noisily
    at interpreter shutdown."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if (thread is not threading.current_thread()
                and type(thread).__module__.startswith("orbax.")):
            with contextlib.suppress(Exception):   # orbax's threads re-raise their error
                thread.join(max(deadline - time.monotonic(), 0.0))
