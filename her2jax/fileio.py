"""Writing files safely: one place for the atomic write, file modes and output folders.

Every file her2jax writes for a reader (predictions, metrics, reports, features, configs,
records) goes through :func:`atomic_write`: a temporary file in the same folder, written,
flushed to disk, given the mode ``open()`` would give it (``0o666`` less the umask; the
console scripts set a umask of at least ``0o027``) instead of ``tempfile.mkstemp``'s
``0o600``, then renamed over the destination. A reader, or a rerun after a kill or a full
disk, sees the old file or the whole new one, never half of one, and no temporary file is
left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import IO


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it,
    which would race with threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)   # no /proc: a file made meanwhile is stricter, never looser
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits ``open()`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None] | None = None, *,
                 binary: bool = True, suffix: str = ".tmp",
                 write_path: Callable[[pathlib.Path], None] | None = None) -> pathlib.Path:
    """Writes ``path`` through a temporary file in its folder and one rename.

    Args:
      path: the destination (its folder is created).
      write: called with the open temporary file (binary, or UTF-8 text with ``binary``
        False); writes the content.
      suffix: the temporary file's suffix (a writer that looks at the name, e.g. nibabel's
        ``.nii.gz``, needs the real one).
      write_path: instead of ``write``, called with the temporary file's path, for writers
        that open the file themselves.

    Returns:
      ``path``.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with (os.fdopen(fd, "wb") if binary
              else os.fdopen(fd, "w", encoding="utf-8", newline="")) as f:
            if write_path is not None:
                write_path(pathlib.Path(tmp))
            else:
                write(f)
                f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """``text`` (UTF-8) to ``path``, atomically."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def write_json(path: str | os.PathLike, value, *, indent: int | None = 2) -> pathlib.Path:
    """``value`` as JSON (and a final newline) to ``path``, atomically."""
    return write_text(path, json.dumps(value, indent=indent) + "\n")


@contextlib.contextmanager
def new_folders_removed_on_error(*folders: str | os.PathLike):
    """Removes, if the block raises (a full disk, Ctrl-C, a bug), each of ``folders`` that did
    not exist when it began: an output folder a command creates is complete or absent, never
    left half-filled. Folders that existed are left to their atomic writers."""
    new = [pathlib.Path(f) for f in folders if not pathlib.Path(f).exists()]
    try:
        yield
    except BaseException:
        for folder in new:
            shutil.rmtree(folder, ignore_errors=True)
        raise
