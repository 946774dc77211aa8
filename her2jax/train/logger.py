"""Run logs on process 0: ``metrics.jsonl`` and TensorBoard event files (no TensorFlow).

A full disk (or a quota, or a read-only remount) makes :meth:`MetricsLogger.write` raise the
``OSError`` in the caller's thread, and the training loop turns it into its one-line "cannot
write the run's logs" error. Neither file keeps half a record: a failed append is cut back to
where it began, so ``metrics.jsonl`` holds every record whose ``write`` returned, each whole,
and nothing that was written before is lost.

Why fail instead of carrying on without TensorBoard: the event files live on the same disk as
``metrics.jsonl`` and the checkpoints, so a run that cannot log soon cannot save either, and
every other full-disk fault in her2jax is already a one-line stop after which the same command
resumes from the last checkpoint (the logs drop what that checkpoint does not hold). Curves
that silently end while training goes on would be the more surprising outcome. The event files
are therefore written here, synchronously, in TensorBoard's record format, instead of through
tensorboardX's ``SummaryWriter``: its background writer thread dies on the first failed write,
its queue of 10 events then fills, and the next ``add_scalar`` (or ``close``) blocks forever.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import struct
import sys
import time
from pathlib import Path

import jax

from her2jax import fileio
from her2jax.evaluate import files

_FILE_NUMBER = itertools.count()   # two event files of one process never share a name


class MetricsLogger:
    """Appends one JSON object per line to ``workdir/metrics.jsonl`` and mirrors scalars to
    TensorBoard event files in ``workdir/tensorboard``. Other processes write nothing.
    """

    def __init__(self, workdir: Path, *, tensorboard: bool = True,
                 resume_step: int | None = None):
        """Args:
          workdir: the run's directory.
          tensorboard: also write TensorBoard event files.
          resume_step: the step a training run starts or resumes from (0 for a fresh start):
            records of later steps (written before a kill, by work no checkpoint holds) are
            dropped, from metrics.jsonl and (TensorBoard's purge at ``resume_step + 1``) from
            TensorBoard, so every step is logged once. None keeps everything.

        Raises:
          OSError: the workdir cannot be written.
        """
        self.enabled = jax.process_index() == 0
        self._file: _AppendOnly | None = None
        self._events: _EventFile | None = None
        if not self.enabled:
            return
        path = Path(workdir) / "metrics.jsonl"
        if path.exists() and resume_step is not None:
            _drop_after(path, resume_step)
        self._file = _AppendOnly(path)
        if tensorboard:
            purge = None if resume_step is None else resume_step + 1
            try:
                self._events = _EventFile(Path(workdir) / "tensorboard", purge_step=purge)
            except BaseException:
                self._file.close()
                raise

    def write(self, step: int, split: str, values: dict) -> None:
        """Logs ``values`` (scalars) of ``split`` ('train', 'val', ...) at ``step``.

        Raises:
          OSError: a file could not be written (disk full, ...). The metrics.jsonl record is
            written first, so it is there unless metrics.jsonl itself failed. After a failure
            TensorBoard stays off for this logger (its file is closed, cut back to whole
            records); metrics.jsonl is the run's record.
        """
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, int | float) or hasattr(v, "item") else v)
                 for k, v in values.items()}
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **{
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in clean.items()}}
        self._file.append((json.dumps(record) + "\n").encode())
        if self._events is not None:
            scalars = {f"{split}/{k}": v for k, v in clean.items()
                       if isinstance(v, float) and math.isfinite(v)}
            try:
                self._events.add_scalars(scalars, int(step))
            except BaseException:
                self._events.close()
                self._events = None
                raise

    def close(self) -> None:
        """Closes the files (nothing is buffered: every write was already on its way)."""
        for name in ("_file", "_events"):
            handle = getattr(self, name)
            setattr(self, name, None)
            if handle is not None:
                handle.close()


class _AppendOnly:
    """A file that only grows by whole records: an append that fails (a full disk) is cut
    back to where it began, so no reader ever sees half a record."""

    def __init__(self, path: Path):
        self.path = path
        # Unbuffered and O_APPEND: a record is on its way to the disk when append returns,
        # and nothing is left in a buffer to fail again at close.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def append(self, data: bytes) -> None:
        start = os.fstat(self._fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except BaseException as e:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            if isinstance(e, OSError):   # name the file: os.write's error names none
                raise OSError(e.errno, e.strerror, str(self.path)) from None
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _EventFile:
    """A TensorBoard event file: TFRecord-framed ``Event`` protos (tensorboardX's protos and
    CRC), written in the caller's thread."""

    def __init__(self, folder: Path, *, purge_step: int | None):
        self._proto = _tensorboard_protos()
        folder.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_FILE_NUMBER)}")
        self._file = _AppendOnly(folder / name)
        event_pb2 = self._proto.event_pb2
        events = [event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")]
        if purge_step is not None:
            # What tensorboardX's purge_step writes: TensorBoard drops the events of steps
            # >= purge_step that earlier files hold (the killed run's, not in a checkpoint).
            events += [
                event_pb2.Event(wall_time=time.time(), step=purge_step,
                                file_version="brain.Event:2"),
                event_pb2.Event(wall_time=time.time(), step=purge_step,
                                session_log=event_pb2.SessionLog(
                                    status=event_pb2.SessionLog.START))]
        try:
            self._write(events)
        except BaseException:
            self._file.close()
            raise

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        if not scalars:
            return
        summary_pb2 = self._proto.summary_pb2
        now = time.time()
        self._write([self._proto.event_pb2.Event(
            wall_time=now, step=step,
            summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(
                tag=tag, simple_value=value)])) for tag, value in scalars.items()])

    def _write(self, events) -> None:
        crc = self._proto.masked_crc32c
        records = []
        for event in events:
            body = event.SerializeToString()
            header = struct.pack("<Q", len(body))
            records += [header, struct.pack("<I", crc(header)), body,
                        struct.pack("<I", crc(body))]
        self._file.append(b"".join(records))

    def close(self) -> None:
        self._file.close()


def _tensorboard_protos():
    """tensorboardX's Event / Summary protos and record CRC, imported without PyTorch.

    Importing any part of tensorboardX runs its package ``__init__``, which imports torch when
    it is installed (to accept tensors): seconds and hundreds of MB per training process for
    nothing scalars need. A ``None`` entry in ``sys.modules`` makes that import fail as if
    torch were absent, only for this import.
    """
    import types

    hide = "torch" not in sys.modules and "tensorboardX" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX.proto import event_pb2, summary_pb2
        from tensorboardX.record_writer import masked_crc32c
    finally:
        if hide:
            del sys.modules["torch"]
    return types.SimpleNamespace(event_pb2=event_pb2, summary_pb2=summary_pb2,
                                 masked_crc32c=masked_crc32c)


def _drop_after(path: Path, step: int) -> None:
    """Rewrites metrics.jsonl without the records after ``step``, and without a line torn by a
    kill mid-write (atomically; a no-op when there are none)."""
    def keep(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and line.endswith("\n") and keep(line)]
    if len(kept) == len(lines):
        return
    fileio.write_text(path, "".join(kept))


def read_metrics(workdir: Path) -> list[dict]:
    """All whole records of ``workdir/metrics.jsonl`` (``evaluate.files.read_log``)."""
    return files.read_log(Path(workdir) / "metrics.jsonl")
