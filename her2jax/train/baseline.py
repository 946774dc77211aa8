"""The hand-made kinetic baseline, fitted and scored on the run's own splits at every eval.

When the prepared dataset holds ``kinetic_features.csv`` (five features per case, see
:mod:`her2jax.data.kinetic_features`), ``--mode=eval`` fits
``make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight=...))`` on the
run's training split (``pipeline.select_splits(...)["train"]``): the patients the model trained
on, with the labels it trained on, so with ``data.permute_train_labels`` the baseline sees the
permuted labels too and the negative control covers it. ``class_weight`` is ``'balanced'`` when
``train.class_weighting`` is. It then scores every evaluated split and writes (process 0):

* ``eval/<split>/baseline_metrics.json``: ``metrics.summarize`` of its probabilities, in the
  format of ``metrics.json``, with the same bootstrap;
* ``eval/baseline.json``: ``{model, features, fitted_on: 'train', n_train, n_train_skipped,
  class_weight, splits: {split: {n, n_skipped, macro_auc: {value, ci_low, ci_high}}}}``.

Cases with an undefined feature (NaN) are left out of the fit and of the scores, with a logged
count. A dataset without the file (prepared before it existed) gets no baseline and one log
line; the model's evaluation never depends on the baseline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from absl import logging

from her2jax.data import kinetic_features, pipeline
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files, metrics

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

LABEL = "hand-made kinetic baseline (5 features + logistic regression, same training patients)"
METRICS_FILE = "baseline_metrics.json"
SUMMARY_FILE = "baseline.json"
FITTED_ON = "train"
LR_MAX_ITER = 1000


@dataclasses.dataclass(frozen=True)
class Scored:
    """A fitted baseline's results.

    Attributes:
      summary: the content of ``eval/baseline.json``.
      metrics: ``{split: metrics.summarize(...)}``, the ``baseline_metrics.json`` of each split.
    """

    summary: dict
    metrics: dict[str, dict]


def make_sklearn(*, balanced: bool) -> Pipeline:
    """The unfitted scikit-learn pipeline of the baseline."""
    # scikit-learn loads here, not with the module: see pca_lr.make_sklearn.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(
        max_iter=LR_MAX_ITER, class_weight="balanced" if balanced else None))


def _finite_rows(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x).all(axis=1)


def fit_and_score(dataset: pipeline.Dataset, config, splits: Mapping[str, pipeline.Split], *,
                  n_boot: int, train: pipeline.Split | None = None) -> Scored | None:
    """Fits the baseline on the run's training split and scores ``splits``.

    Args:
      dataset: the run's prepared dataset.
      config: the run's config (``data`` chooses the splits, ``train.class_weighting`` the
        class weights).
      splits: the evaluated splits, by name.
      n_boot: bootstrap resamples of ``metrics.summarize`` (as for the model).
      train: the split to fit on (default: the config's ``train``; a fold ensemble's is every
        patient of the cross-validation).

    Returns:
      The results, or None (logged) when the dataset has no usable ``kinetic_features.csv``
      or the training cases with defined features hold fewer than two classes.
    """
    try:
        table = kinetic_features.read_table(dataset.path)
    except Her2jaxError as e:
        logging.warning("no hand-made baseline: %s", e)
        return None
    if table is None:
        logging.warning("no hand-made baseline: the dataset %s has no %s (prepared before it "
                        "existed; her2jax-prepare --overwrite adds it)", dataset.path,
                        kinetic_features.FILE)
        return None
    fitted_on = FITTED_ON if train is None else train.name
    if train is None:
        train = pipeline.select_splits(dataset, config.data)[FITTED_ON]
    x = kinetic_features.matrix(table, train.patient_ids)
    keep = _finite_rows(x)
    if not keep.all():
        logging.warning("hand-made baseline: %d of %d training cases have an undefined kinetic "
                        "feature and are left out of the fit", int((~keep).sum()), len(keep))
    y = train.labels[keep]
    if len(np.unique(y)) < 2:
        logging.warning("no hand-made baseline: its training cases hold fewer than two classes "
                        "(%s)", np.unique(y).tolist())
        return None
    balanced = config.train.class_weighting == "balanced"
    fitted = make_sklearn(balanced=balanced).fit(x[keep], y)
    classes = np.asarray(fitted.classes_, np.int64)

    summary = {"model": LABEL, "features": list(kinetic_features.FEATURES),
               "fitted_on": fitted_on, "n_train": int(keep.sum()),
               "n_train_skipped": int((~keep).sum()),
               "class_weight": "balanced" if balanced else None, "splits": {}}
    scored = {}
    fitted_ids = set(train.patient_ids)
    for name, split in splits.items():
        if fitted_ids & set(split.patient_ids):   # e.g. a fold ensemble's pooled oof split
            logging.info("hand-made baseline: not scored on %s, which holds patients it was "
                         "fitted on", name)
            continue
        x = kinetic_features.matrix(table, split.patient_ids)
        keep = _finite_rows(x)
        if not keep.all():
            logging.warning("hand-made baseline: %d of %d cases of %s have an undefined kinetic "
                            "feature and are not scored", int((~keep).sum()), len(keep), name)
        if not keep.any():
            continue
        probs = np.zeros((int(keep.sum()), len(split.class_names)), np.float64)
        probs[:, classes] = fitted.predict_proba(x[keep])   # a class never seen gets 0
        scored[name] = metrics.summarize(split.labels[keep], probs, split.class_names,
                                         n_boot=n_boot)
        summary["splits"][name] = {"n": int(keep.sum()), "n_skipped": int((~keep).sum()),
                                   "macro_auc": scored[name]["macro_auc"]}
    return Scored(summary, scored)


def write(eval_dir: Path, scored: Scored | None, names: Iterable[str]) -> None:
    """Writes ``eval/baseline.json`` and ``eval/<split>/baseline_metrics.json``; removes those
    of ``names`` (the evaluated splits) that this evaluation has no baseline for, so that a
    stale baseline is never shown next to a fresh evaluation."""
    eval_dir = Path(eval_dir)
    for name in names:
        if scored is None or name not in scored.metrics:
            (eval_dir / name / METRICS_FILE).unlink(missing_ok=True)
    if scored is None:
        (eval_dir / SUMMARY_FILE).unlink(missing_ok=True)
        return
    for name, summary in scored.metrics.items():
        files.write_metrics(eval_dir / name / METRICS_FILE, summary)
    files.write_metrics(eval_dir / SUMMARY_FILE, scored.summary)
