"""The run log: metrics.jsonl and TensorBoard files on process 0."""

from __future__ import annotations

import json
import subprocess
import sys

from her2jax.train import logger


def test_a_resumed_run_drops_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    log = logger.MetricsLogger(tmp_path)
    for step in range(1, 6):
        log.write(step, "train", {"loss": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "split": "tr')          # torn by a kill mid-write
    log = logger.MetricsLogger(tmp_path, resume_step=3)
    log.write(4, "train", {"loss": 40.0})
    log.close()
    records = logger.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                         (4, 40.0)]


def test_a_fresh_logger_keeps_everything(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 9, "split": "val"}) + "\n")
    logger.MetricsLogger(tmp_path, tensorboard=False).close()
    assert logger.read_metrics(tmp_path) == [{"step": 9, "split": "val"}]


def test_tensorboard_files_are_written_without_importing_torch(tmp_path):
    code = ("import sys; from her2jax.train import logger; "
            f"log = logger.MetricsLogger({str(tmp_path)!r}); "
            "log.write(1, 'train', {'loss': 0.5}); log.close(); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
