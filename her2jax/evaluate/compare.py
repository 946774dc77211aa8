"""Paired bootstrap comparison of two models' macro-average AUC on the same patients.

Both predictions.csv must hold the same patients, the same classes and the same true label
for every patient (unlabelled patients, ``label == ''``, must match too, and are then left
out). Patients are aligned by ``patient_id``.

Method: each resample draws, with replacement, as many patients from every true class as it
has (stratified, class sizes preserved, ``numpy.random.default_rng(seed)``), and the SAME
resample scores both models, so the difference keeps the pairing. The statistic is
``d = macro AUC(B) - macro AUC(A)``, macro AUC as in ``metrics`` (mean of the one-vs-rest
AUCs of the classes present; for two classes the AUC of the second class). Intervals are
95% percentile intervals of the resampled values.

Two-sided p-value (for H0: d = 0), from the bootstrap distribution of ``d*``::

    p = min(1, 2 * min(1 + #{d* <= 0}, 1 + #{d* >= 0}) / (n_boot + 1))

the +1 correction keeps p > 0 (its smallest value is ``2 / (n_boot + 1)``), and identical
models (every ``d* = 0``) give p = 1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from her2jax.errors import Her2jaxError
from her2jax.evaluate import files
from her2jax.evaluate.metrics import format_auc

_CHUNK = 250  # resamples per vectorised step (and per progress-bar tick)
_CONFIDENCE = 0.95


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC for each row of per-case ``weights`` [B, N]; returns [B].

    A weighted Mann-Whitney statistic over one sort: for each positive case, the weight of
    negatives scored lower plus half the weight of the ties.
    """
    neg_order = np.argsort(scores[~positive], kind="stable")
    neg_scores = scores[~positive][neg_order]
    below = np.searchsorted(neg_scores, scores[positive], side="left")
    up_to = np.searchsorted(neg_scores, scores[positive], side="right")
    w_pos = weights[:, positive]
    cumulative = np.zeros((len(weights), len(neg_scores) + 1))
    np.cumsum(weights[:, ~positive][:, neg_order], axis=1, out=cumulative[:, 1:])
    lower = 0.5 * (cumulative[:, below] + cumulative[:, up_to])
    return np.sum(w_pos * lower, axis=1) / (w_pos.sum(axis=1) * cumulative[:, -1])


def _macro_auc(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro AUC [B] for each row of ``weights`` [B, N] (classes present only)."""
    k = probs.shape[1]
    if k == 2:
        return _weighted_auc(probs[:, 1], labels == 1, weights)
    parts = [_weighted_auc(probs[:, c], labels == c, weights)
             for c in range(k) if np.any(labels == c)]
    return np.mean(parts, axis=0)


def _few(ids) -> str:
    ids = sorted(map(str, ids))
    return ", ".join(ids[:5]) + (f" (+{len(ids) - 5} more)" if len(ids) > 5 else "")


def _check_pair(frame_a: pd.DataFrame, frame_b: pd.DataFrame, name_a: str,
                name_b: str) -> tuple[pd.DataFrame, list[str]]:
    """Frame B reindexed to A's patient order; refuses pairs that are not the same patients."""
    both = f"{name_a} vs {name_b}"
    for name, frame in ((name_a, frame_a), (name_b, frame_b)):
        duplicated = frame["patient_id"][frame["patient_id"].duplicated()]
        if len(duplicated):
            raise Her2jaxError(f"duplicate patient ids {_few(set(duplicated))}", file=name,
                               key="patient_id")
    classes_a, classes_b = files.class_names_of(frame_a), files.class_names_of(frame_b)
    if classes_a != classes_b:
        raise Her2jaxError(f"the two files have different classes: {classes_a} in {name_a}, "
                           f"{classes_b} in {name_b}", file=both, key="prob_<class>")
    ids_a, ids_b = set(frame_a["patient_id"]), set(frame_b["patient_id"])
    if ids_a != ids_b:
        parts = []
        if ids_a - ids_b:
            parts.append(f"only in {name_a}: {_few(ids_a - ids_b)}")
        if ids_b - ids_a:
            parts.append(f"only in {name_b}: {_few(ids_b - ids_a)}")
        raise Her2jaxError("the two files hold different patients (" + "; ".join(parts) + ")",
                           file=both, key="patient_id")
    frame_b = frame_b.set_index("patient_id").loc[frame_a["patient_id"]].reset_index()
    differ = frame_a["label"].to_numpy() != frame_b["label"].to_numpy()
    if differ.any():
        raise Her2jaxError(f"the true label differs for patients "
                           f"{_few(frame_a['patient_id'][differ])}", file=both, key="label")
    return frame_b, classes_a


def _percentile_entry(value: float, boot: np.ndarray) -> dict:
    alpha = (1.0 - _CONFIDENCE) / 2.0
    low, high = (float(x) for x in np.percentile(boot, [100 * alpha, 100 * (1 - alpha)]))
    return {"value": float(value), "ci_low": low, "ci_high": high}


def paired_bootstrap(frame_a: pd.DataFrame, frame_b: pd.DataFrame, *, n_boot: int = 2000,
                     seed: int = 0, name_a: str = "A", name_b: str = "B",
                     progress: bool = False) -> dict:
    """Paired, class-stratified bootstrap of macro AUC(B) - macro AUC(A) (see module docstring).

    Args:
      frame_a, frame_b: predictions frames (``files.read_predictions``) of two models on the
        same patients.
      n_boot: bootstrap resamples (>= 1).
      seed: seed of the bootstrap's ``numpy.random.Generator``.
      name_a, name_b: how errors name the two inputs (their file paths).
      progress: show a tqdm progress bar on stderr.

    Returns:
      ``{"n", "class_names", "macro_auc_a", "macro_auc_b", "difference", "p_value",
      "bootstrap"}``: ``n`` labelled patients; the AUCs and the difference are
      ``{"value", "ci_low", "ci_high"}`` (95% percentile intervals); ``bootstrap`` records
      ``method``, ``n_boot`` and ``seed``.

    Raises:
      Her2jaxError: naming both inputs, when the patients, the classes or a patient's label
        differ; or fewer than two classes are present among the labelled patients.
    """
    if n_boot < 1:
        raise Her2jaxError(f"n_boot must be >= 1, got {n_boot}", key="n_boot")
    frame_b, class_names = _check_pair(frame_a, frame_b, name_a, name_b)
    labels, probs_a, _ = files.prediction_arrays(frame_a)
    _, probs_b, _ = files.prediction_arrays(frame_b)
    keep = labels >= 0
    labels, probs_a, probs_b = labels[keep], probs_a[keep], probs_b[keep]
    n = len(labels)
    by_class = [np.flatnonzero(labels == c) for c in range(len(class_names))]
    if sum(len(members) > 0 for members in by_class) < 2:
        raise Her2jaxError(f"need labelled patients of at least two classes to compare AUCs; "
                           f"{n} labelled", file=f"{name_a} vs {name_b}", key="label")

    ones = np.ones((1, n))
    auc_a = float(_macro_auc(labels, probs_a, ones)[0])
    auc_b = float(_macro_auc(labels, probs_b, ones)[0])
    rng = np.random.default_rng(seed)
    boot_a, boot_b = [], []
    with tqdm(total=n_boot, desc="paired bootstrap", unit="resample", disable=not progress) as bar:
        for start in range(0, n_boot, _CHUNK):
            size = min(_CHUNK, n_boot - start)
            # Per-patient resampling counts [size, n], the same for A and B (the pairing).
            draws = np.concatenate(
                [members[rng.integers(0, len(members), size=(size, len(members)))]
                 for members in by_class if len(members)], axis=1)
            flat = (draws + n * np.arange(size)[:, None]).ravel()
            counts = np.bincount(flat, minlength=size * n).reshape(size, n).astype(np.float64)
            boot_a.append(_macro_auc(labels, probs_a, counts))
            boot_b.append(_macro_auc(labels, probs_b, counts))
            bar.update(size)
    boot_a, boot_b = np.concatenate(boot_a), np.concatenate(boot_b)
    diff = boot_b - boot_a
    tail = min(np.sum(diff <= 0), np.sum(diff >= 0))
    p_value = min(1.0, 2.0 * (1 + tail) / (n_boot + 1))
    return {
        "n": int(n),
        "class_names": list(class_names),
        "macro_auc_a": _percentile_entry(auc_a, boot_a),
        "macro_auc_b": _percentile_entry(auc_b, boot_b),
        "difference": _percentile_entry(auc_b - auc_a, diff),
        "p_value": float(p_value),
        "bootstrap": {"method": "paired stratified percentile", "n_boot": int(n_boot),
                      "seed": int(seed)},
    }


def compare_files(path_a: str | os.PathLike, path_b: str | os.PathLike, **kwargs) -> dict:
    """Reads two predictions.csv and runs :func:`paired_bootstrap`; adds ``"files"``."""
    result = paired_bootstrap(files.read_predictions(path_a), files.read_predictions(path_b),
                              name_a=str(path_a), name_b=str(path_b), **kwargs)
    return {"files": {"a": str(path_a), "b": str(path_b)}, **result}


def _number(x: float, sign: str = "") -> str:
    text = f"{x:{sign}.3f}"
    return "0.000" if text.lstrip("+-") == "0.000" else text  # no "+0.000" / "-0.000"


def format_comparison(result: dict, *, labels: Sequence[str] = ("A", "B")) -> str:
    """The study-style line: ``macro-average AUC A 0.812 (95% CI ...), B 0.845 (...);
    difference +0.033 (95% CI 0.004–0.061), p = 0.030``."""
    d = result["difference"]
    p = result["p_value"]
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    return (f"macro-average AUC {labels[0]} {format_auc(result['macro_auc_a'])}, "
            f"{labels[1]} {format_auc(result['macro_auc_b'])}; difference {_number(d['value'], '+')} "
            f"(95% CI {_number(d['ci_low'])}\u2013{_number(d['ci_high'])}), {p_text}")
