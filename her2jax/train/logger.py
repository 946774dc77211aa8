"""Run logs on process 0: ``metrics.jsonl`` and TensorBoard event files (no TensorFlow)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax


class MetricsLogger:
    """Appends one JSON object per line to ``workdir/metrics.jsonl`` and mirrors scalars to
    TensorBoard event files in ``workdir/tensorboard`` (tensorboardX). Other processes
    write nothing.
    """

    def __init__(self, workdir: Path, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._file = None
        self._writer = None
        if not self.enabled:
            return
        self._file = open(Path(workdir) / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(Path(workdir) / "tensorboard"))

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


def read_metrics(workdir: Path) -> list[dict]:
    """All records of ``workdir/metrics.jsonl``."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
