"""The run log: metrics.jsonl and TensorBoard files on process 0."""

from __future__ import annotations

import errno
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

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
    (header, scalar) = read_events(events[0])
    assert header.file_version == "brain.Event:2"
    assert scalar.step == 1 and [(v.tag, v.simple_value) for v in scalar.summary.value] == [
        ("train/loss", 0.5)]


def test_a_resumed_run_tells_tensorboard_to_drop_the_later_steps(tmp_path):
    logger.MetricsLogger(tmp_path, resume_step=3).close()
    (events,) = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    purge = [e for e in read_events(events) if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in purge] == [(4, 1)]   # START at step 4


# ----------------------------------------------------------------------------- a full disk


# Logs steps 1-5, fills the disk, then logs 400 more steps (far more than tensorboardX's
# queue of 10 events and its 8 KiB buffer), then closes; prints what each write did.
FULL_DISK_CHILD = """
import errno, json, os, sys
from her2jax.train import logger
workdir, filler = sys.argv[1], sys.argv[2]
log = logger.MetricsLogger(workdir, resume_step=0)
for step in range(1, 6):
    log.write(step, "train", {"loss": step / 10, "lr": 0.1})
with open(filler, "wb", buffering=0) as f:
    for size in (4096, 1):   # whole pages, then the last bytes of a page
        try:
            while True:
                f.write(bytes(size))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
done = {"ok": [], "failed": []}
for step in range(6, 406):
    try:
        log.write(step, "train", {"loss": step / 10, "lr": 0.1, "grad_norm": 1.0})
        done["ok"].append(step)
    except OSError as e:
        done["failed"].append([step, e.errno])
try:
    log.close()
    done["close"] = "ok"
except OSError as e:
    done["close"] = e.errno
print(json.dumps(done))
"""


def read_events(path: Path) -> list:
    """The Event protos of a TensorBoard event file, checking its record framing and CRCs."""
    proto = logger._tensorboard_protos()
    masked_crc32c = proto.masked_crc32c
    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header)
        body = data[at + 12:at + 12 + length]
        assert len(body) == length, "a torn record at the end of the file"
        assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == \
            masked_crc32c(body)
        events.append(proto.event_pb2.Event.FromString(body))
        at += 16 + length
    return events


def test_a_full_disk_neither_blocks_the_log_nor_loses_its_records(tmpfs):
    mount = tmpfs(256 * 1024)
    workdir = mount / "run"
    workdir.mkdir()
    try:
        result = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(workdir),
                                 str(mount / "filler")], capture_output=True, text=True,
                                timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("logging on a full disk blocked (tensorboardX's writer thread died and "
                    "its queue filled up)")
    assert result.returncode == 0, result.stderr[-3000:]
    done = json.loads(result.stdout.strip().splitlines()[-1])
    # The disk was full: writes failed with ENOSPC, loudly, in the caller's thread.
    assert done["failed"] and {e for _, e in done["failed"]} == {errno.ENOSPC}, done
    assert "Exception in thread" not in result.stderr, result.stderr[-3000:]
    # metrics.jsonl holds every record whose write returned, and only complete lines.
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert all(line.endswith("\n") for line in lines)
    steps = [json.loads(line)["step"] for line in lines]
    assert steps[:5] == [1, 2, 3, 4, 5] and steps == sorted(set(steps))
    assert set(done["ok"]) <= set(steps)
    assert done["close"] == "ok"
    # The TensorBoard file ends on a whole record (a failed append is cut back), and holds
    # every step logged before TensorBoard's first failure.
    (events,) = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    losses = {e.step: v.simple_value for e in read_events(events)
              for v in e.summary.value if v.tag == "train/loss"}
    before = [*range(1, 6), *(s for s in done["ok"] if s < done["failed"][0][0])]
    assert len(before) > 5
    assert [losses[s] for s in before] == pytest.approx([s / 10 for s in before])
