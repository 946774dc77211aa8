"""python -m her2jax.cli.summary (what `make demo` prints after eval): the held-out centres'
macro AUC of the model beside the hand-made baseline's, from hand-written eval files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from her2jax.cli import summary
from her2jax.evaluate import files

REPO = Path(__file__).resolve().parents[1]


def _auc(value, low, high) -> dict:
    return {"macro_auc": {"value": value, "ci_low": low, "ci_high": high}}


def _workdir(tmp_path: Path) -> Path:
    eval_dir = tmp_path / "run" / "eval"
    files.write_metrics(eval_dir / "val" / "metrics.json", _auc(0.9, 0.8, 0.95))
    files.write_metrics(eval_dir / "val" / "baseline_metrics.json", _auc(0.6, 0.5, 0.7))
    files.write_metrics(eval_dir / "test_CENTER_C" / "metrics.json", _auc(0.784, 0.703, 0.851))
    files.write_metrics(eval_dir / "test_CENTER_C" / "baseline_metrics.json",
                        _auc(0.746, 0.655, 0.834))
    files.write_metrics(eval_dir / "test_CENTER_A" / "metrics.json", _auc(0.71, None, None))
    return tmp_path / "run"


def test_one_line_per_held_out_centre_model_then_baseline(tmp_path):
    workdir = _workdir(tmp_path)
    assert summary.held_out_lines(workdir) == [
        "training loss: none logged (chance ln K = 1.10)",
        "held-out CENTER_A: model macro AUC 0.71 (CI n/a) | hand-made baseline n/a (eval wrote "
        "no baseline_metrics.json)",
        "held-out CENTER_C: model macro AUC 0.78 (0.70-0.85) | hand-made baseline 0.75 "
        "(0.66-0.83)"]
    assert summary.held_out_lines(tmp_path / "none") == [
        f"no held-out centre evaluated in {tmp_path / 'none' / 'eval'} (run --mode=eval)"]


def test_the_training_loss_is_the_mean_of_the_last_logged_steps_against_chance(tmp_path):
    workdir = _workdir(tmp_path)
    files.write_metrics(workdir / "eval" / "test_CENTER_A" / "metrics.json",
                        {**_auc(0.71, None, None), "class_names": ["neg", "pos"]})
    records = [{"step": 10 * k, "split": "train", "loss": float(k)} for k in range(1, 9)]
    records.insert(3, {"step": 35, "split": "val", "loss": 99.0})   # not a training record
    (workdir / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in records) + "\n{torn")
    # Steps 40..80 (losses 4..8): mean 6; two classes: ln 2.
    assert summary.held_out_lines(workdir)[0] == (
        "training loss 6.00 (mean of the last 5 logged steps, up to step 80) | chance ln 2 = "
        "0.69")


def test_cli_prints_the_lines_and_refuses_a_missing_workdir_argument(tmp_path):
    workdir = _workdir(tmp_path)
    done = subprocess.run([sys.executable, "-m", "her2jax.cli.summary", str(workdir)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == summary.held_out_lines(workdir)
    bad = subprocess.run([sys.executable, "-m", "her2jax.cli.summary"], capture_output=True,
                         text=True, cwd=REPO)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
