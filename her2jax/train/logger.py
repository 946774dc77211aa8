"""Run logs on process 0: ``metrics.jsonl`` and TensorBoard event files (no TensorFlow)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax


class MetricsLogger:
    """Appends one JSON object per line to ``workdir/metrics.jsonl`` and mirrors scalars to
    TensorBoard event files in ``workdir/tensorboard`` (tensorboardX). Other processes
    write nothing.
    """

    def __init__(self, workdir: Path, *, tensorboard: bool = True,
                 resume_step: int | None = None):
        """Args:
          workdir: the run's directory.
          tensorboard: also write TensorBoard event files.
          resume_step: the step a training run starts or resumes from (0 for a fresh start):
            records of later steps (written before a kill, by work no checkpoint holds) are
            dropped, from metrics.jsonl and (``purge_step``) from TensorBoard, so every step
            is logged once. None keeps everything.
        """
        self.enabled = jax.process_index() == 0
        self._file = None
        self._writer = None
        if not self.enabled:
            return
        path = Path(workdir) / "metrics.jsonl"
        if path.exists() and resume_step is not None:
            _drop_after(path, resume_step)
        self._file = open(path, "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            SummaryWriter = _summary_writer_class()
            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge)

    def write(self, step: int, split: str, values: dict) -> None:
        """Logs ``values`` (scalars) of ``split`` ('train', 'val', ...) at ``step``."""
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, int | float) or hasattr(v, "item") else v)
                 for k, v in values.items()}
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **{
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in clean.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in clean.items():
                if isinstance(value, float) and math.isfinite(value):
                    self._writer.add_scalar(f"{split}/{key}", value, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch when it is installed (to accept tensors), which costs every
    training process seconds and hundreds of MB; scalars need none of it. A ``None`` entry in
    ``sys.modules`` makes that import fail as if torch were absent, only for this import.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def read_metrics(workdir: Path) -> list[dict]:
    """All records of ``workdir/metrics.jsonl``."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
