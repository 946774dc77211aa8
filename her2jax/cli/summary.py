"""The held-out result of an evaluated workdir: the final training loss against chance, then
one line per test centre with the model and the hand-made baseline.

  python -m her2jax.cli.summary WORKDIR

Reads ``eval/test_<centre>/metrics.json`` and, when ``--mode=eval`` could fit it,
``eval/test_<centre>/baseline_metrics.json`` (the hand-made kinetic baseline,
:mod:`her2jax.train.baseline`), and prints for example

  training loss 0.71 (mean of the last 5 logged steps, up to step 300) | chance ln 3 = 1.10
  held-out CENTER_C: model macro AUC 0.78 (0.70-0.85) | hand-made baseline 0.75 (0.66-0.83)

with the 95% bootstrap CIs in brackets. ``make demo`` runs it after the evaluation.
"""

from __future__ import annotations

import math
from pathlib import Path

from her2jax import cli
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files

TEST_PREFIX = "test_"
METRICS_FILE = "metrics.json"
BASELINE_FILE = "baseline_metrics.json"   # her2jax.train.baseline.METRICS_FILE
LOSS_WINDOW = 5


def _auc(entry: dict | None) -> str:
    """``0.78 (0.70-0.85)``; ``0.78 (CI n/a)`` without an interval; ``n/a`` when undefined."""
    def defined(x) -> bool:
        return isinstance(x, int | float) and math.isfinite(x)

    entry = entry or {}
    value, low, high = entry.get("value"), entry.get("ci_low"), entry.get("ci_high")
    if not defined(value):
        return "n/a"
    if not (defined(low) and defined(high)):
        return f"{value:.2f} (CI n/a)"
    return f"{value:.2f} ({low:.2f}-{high:.2f})"


def held_out_lines(workdir) -> list[str]:
    """One line per evaluated test split of ``workdir``, in name order.

    Returns:
      The training-loss line, then
      ``held-out <centre>: model macro AUC V (LOW-HIGH) | hand-made baseline V (LOW-HIGH)``
      (``hand-made baseline n/a (...)`` when the evaluation wrote none), or a single line
      saying that no held-out centre was evaluated.

    Raises:
      Her2jaxError: a metrics file is unreadable.
    """
    eval_dir = Path(workdir) / "eval"
    splits = sorted(p.parent.name for p in eval_dir.glob(f"{TEST_PREFIX}*/{METRICS_FILE}"))
    if not splits:
        return [f"no held-out centre evaluated in {eval_dir} (run --mode=eval)"]
    lines = [_training_loss_line(Path(workdir), files.read_metrics(
        eval_dir / splits[0] / METRICS_FILE))]
    for name in splits:
        model = files.read_metrics(eval_dir / name / METRICS_FILE)
        baseline_path = eval_dir / name / BASELINE_FILE
        if baseline_path.exists():
            baseline = _auc(files.read_metrics(baseline_path).get("macro_auc"))
        else:
            baseline = f"n/a (eval wrote no {BASELINE_FILE})"
        lines.append(f"held-out {name[len(TEST_PREFIX):]}: model macro AUC "
                     f"{_auc(model.get('macro_auc'))} | hand-made baseline {baseline}")
    return lines


def _training_loss_line(workdir: Path, metrics: dict) -> str:
    """The training loss near the end of training against chance (ln K), from metrics.jsonl;
    the mean of the last ``LOSS_WINDOW`` logged steps (each one batch's loss: noisy)."""
    records = [r for r in files.read_log(workdir / "metrics.jsonl")
               if r.get("split") == "train" and isinstance(r.get("loss"), int | float)]
    chance = math.log(len(metrics.get("class_names") or ()) or 3)
    if not records:
        return f"training loss: none logged (chance ln K = {chance:.2f})"
    last = records[-LOSS_WINDOW:]
    mean = sum(r["loss"] for r in last) / len(last)
    return (f"training loss {mean:.2f} (mean of the last {len(last)} logged steps, up to step "
            f"{last[-1]['step']}) | chance ln {len(metrics.get('class_names') or ()) or 3} = "
            f"{chance:.2f}")


def _main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise Her2jaxError("a workdir is needed: python -m her2jax.cli.summary WORKDIR")
    for line in held_out_lines(argv[1]):
        print(line, flush=True)


def main() -> None:
    cli.run(_main, positional=1)


if __name__ == "__main__":
    main()
