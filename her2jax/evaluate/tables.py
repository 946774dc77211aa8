"""Per-centre and subgroup tables of the study's AUCs, from a predictions.csv frame.

Each row summarises the labelled cases (``label != ''``) of one group with
``metrics.summarize``: ``{"group" | "column", "value", "n", "macro_auc", "micro_auc",
"per_class_auc", "note"}``, every AUC ``{"value", "ci_low", "ci_high"}`` as in metrics.json.

A group that cannot be summarised is not an error: with fewer than ``min_n`` labelled cases,
or fewer than two classes present, its metrics are None and ``note`` says why
(``"n=4: too small for a CI"``, ``"only HER2-low present: AUC undefined"``). Otherwise the note
is empty. An empty centre or clinical value forms its own group, ``"(missing)"``, listed last.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from her2jax.errors import Her2jaxError
from her2jax.evaluate import metrics
from her2jax.evaluate.files import PROB_PREFIX

MISSING = "(missing)"
POOLED = "pooled"


def _labelled(frame: pd.DataFrame, class_names: Sequence[str]) -> tuple[pd.DataFrame,
                                                                          np.ndarray, np.ndarray]:
    """The labelled rows, their [N] int labels and [N, K] float64 probabilities."""
    class_names = [str(name) for name in class_names]
    prob_columns = [PROB_PREFIX + name for name in class_names]
    for column in ("label", *prob_columns):
        if column not in frame.columns:
            raise Her2jaxError(f"predictions have no column '{column}' "
                               f"(classes {', '.join(class_names)})", key=column)
    labelled = frame[frame["label"].astype(str) != ""]
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(labelled["label"]) - set(index))
    if unknown:
        raise Her2jaxError(f"labels {unknown} are not classes ({', '.join(class_names)})",
                           key="label")
    labels = labelled["label"].map(index).to_numpy(dtype=np.int64)
    probs = labelled[prob_columns].to_numpy(dtype=np.float64)
    return labelled, labels, probs


def _metrics(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], *,
             n_boot: int, seed: int, min_n: int) -> dict:
    """``{"n", "macro_auc", "micro_auc", "per_class_auc", "note"}`` of one group."""
    n = len(labels)
    present = [class_names[c] for c in sorted(set(labels.tolist()))]
    note = ""
    if n < min_n:
        note = f"n={n}: too small for a CI"
    elif len(present) < 2:
        note = f"only {present[0]} present: AUC undefined"
    if note:
        return {"n": n, "macro_auc": None, "micro_auc": None, "per_class_auc": None,
                "note": note}
    summary = metrics.summarize(labels, probs, class_names, n_boot=n_boot, seed=seed)
    return {"n": n, "macro_auc": summary["macro_auc"], "micro_auc": summary["micro_auc"],
            "per_class_auc": summary["per_class_auc"], "note": ""}


def _groups(values: pd.Series) -> list[tuple[str, np.ndarray]]:
    """``(name, boolean mask)`` per distinct value, sorted, empty values last as "(missing)"."""
    values = values.astype(str).str.strip()
    names = sorted(set(values) - {""})
    groups = [(name, (values == name).to_numpy()) for name in names]
    missing = (values == "").to_numpy()
    if missing.any():
        groups.append((MISSING, missing))
    return groups


def per_center(frame: pd.DataFrame, class_names: Sequence[str], *, n_boot: int = 2000,
               seed: int = 0, min_n: int = 10) -> list[dict]:
    """One row per centre (sorted) and a last ``"pooled"`` row over all labelled cases.

    Args:
      frame: a predictions frame (``files.read_predictions``).
      class_names: the K classes, in ``prob_<class>`` column order (``files.class_names_of``).
      n_boot: bootstrap resamples of each group's CIs.
      seed: the bootstrap seed (the same for every group).
      min_n: smallest number of labelled cases a group needs to be summarised.

    Returns:
      ``[{"group", "n", "macro_auc", "micro_auc", "per_class_auc", "note"}, ...]``.

    Raises:
      Her2jaxError: a probability column is missing or a label is not a class.
    """
    labelled, labels, probs = _labelled(frame, class_names)
    kwargs = dict(n_boot=n_boot, seed=seed, min_n=min_n)
    rows = [{"group": name, **_metrics(labels[mask], probs[mask], class_names, **kwargs)}
            for name, mask in _groups(labelled["center"])]
    rows.append({"group": POOLED, **_metrics(labels, probs, class_names, **kwargs)})
    return rows


def subgroups(frame: pd.DataFrame, class_names: Sequence[str], columns: Sequence[str], *,
              n_boot: int = 2000, seed: int = 0, min_n: int = 10) -> list[dict]:
    """One row per (clinical column, value), values sorted, ``"(missing)"`` last.

    Args:
      frame: a predictions frame (``files.read_predictions``).
      class_names: the K classes, in ``prob_<class>`` column order.
      columns: the clinical columns to split by (e.g. ``["er", "menopause"]``).
      n_boot, seed, min_n: as in :func:`per_center`.

    Returns:
      ``[{"column", "value", "n", "macro_auc", "micro_auc", "per_class_auc", "note"}, ...]``.

    Raises:
      Her2jaxError: a column is not in the predictions, or as in :func:`per_center`.
    """
    labelled, labels, probs = _labelled(frame, class_names)
    kwargs = dict(n_boot=n_boot, seed=seed, min_n=min_n)
    rows = []
    for column in columns:
        if column not in frame.columns:
            raise Her2jaxError(f"no clinical column '{column}' in the predictions "
                               f"(columns: {', '.join(map(str, frame.columns))})", key=column)
        for value, mask in _groups(labelled[column]):
            rows.append({"column": column, "value": value,
                         **_metrics(labels[mask], probs[mask], class_names, **kwargs)})
    return rows


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`per_center` or :func:`subgroups` rows.

    Columns: group | n | macro AUC (95% CI) | micro AUC (95% CI) | note; a subgroup row's
    group reads ``column = value``; an undefined AUC reads ``n/a``.
    """
    lines = ["| group | n | macro AUC (95% CI) | micro AUC (95% CI) | note |",
             "|---|---:|---|---|---|"]
    for row in rows:
        group = row["group"] if "group" in row else f"{row['column']} = {row['value']}"
        aucs = [metrics.format_auc(row[key]).replace(" (95% CI ", " (") if row[key] else "n/a"
                for key in ("macro_auc", "micro_auc")]
        lines.append("| " + " | ".join(_cell(x) for x in (group, row["n"], *aucs, row["note"]))
                     + " |")
    return "\n".join(lines) + "\n"


def write_tables(eval_dir, frames: dict[str, pd.DataFrame], class_names: Sequence[str],
                 clinical: Sequence[str], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """The per-centre and subgroup tables of the external (test) predictions, pooled.

    Writes ``per_center.{json,md}`` and, when clinical columns are present,
    ``subgroups.{json,md}`` into ``eval_dir``.

    Args:
      eval_dir: the workdir's ``eval`` folder.
      frames: evaluated split name -> its predictions (``files.read_predictions``); the
        splits whose name starts with ``test`` are pooled (none: nothing is written).
      class_names: the scheme's classes.
      clinical: clinical column names carried in the predictions.
      n_boot, seed: bootstrap settings.

    Returns:
      ``{"per_center": rows, "subgroups": rows}`` (empty lists when nothing was pooled).
    """
    from pathlib import Path

    from her2jax.evaluate.files import write_metrics, write_text

    external = [f for name, f in frames.items() if name.startswith("test")]
    if not external:
        return {"per_center": [], "subgroups": []}
    pooled = pd.concat(external, ignore_index=True)
    out = Path(eval_dir)
    centre_rows = per_center(pooled, class_names, n_boot=n_boot, seed=seed)
    write_metrics(out / "per_center.json", {"rows": centre_rows})
    write_text(out / "per_center.md", to_markdown(centre_rows) + "\n")
    present = [c for c in clinical if c in pooled.columns]
    group_rows = subgroups(pooled, class_names, present, n_boot=n_boot, seed=seed) if present \
        else []
    if group_rows:
        write_metrics(out / "subgroups.json", {"rows": group_rows})
        write_text(out / "subgroups.md", to_markdown(group_rows) + "\n")
    return {"per_center": centre_rows, "subgroups": group_rows}
