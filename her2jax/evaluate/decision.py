"""Calibration and decision thresholds fitted on the validation split, applied to the test splits.

A reported test result must not depend on the test labels beyond the metric itself, so
everything tuned after training is fitted on ``val`` and applied unchanged elsewhere:

* **temperature** (``calibration.fit_temperature``): one T for the softmax of ``log p``. It
  keeps every case's argmax, so accuracies, confusion matrices and the three-class decisions
  are unchanged; ECE and Brier score change (both reported before and after). AUCs are always
  computed on the uncalibrated probabilities (metrics.json).
* **binary thresholds** (two-class schemes only): the Youden threshold and the threshold
  reaching 90 % sensitivity, found on val's p(positive) (``metrics`` operating points) and
  used as they are on every other split, with the sensitivity and specificity they give there.
  (metrics.json's own ``binary`` operating points are fitted on each split itself: optimistic,
  kept for comparison.)

``eval/calibration.json`` records what was fitted, on how many cases, and a sentence saying so
for the report; ``eval/<split>/reliability.png`` shows each split's calibrated reliability, and
``eval/<split>/predictions_calibrated.csv`` has the calibrated probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from her2jax.evaluate import calibration, metrics

FITTED_ON = "val"


def _brier(labels: np.ndarray, probs: np.ndarray) -> float | None:
    if not len(labels):
        return None
    one_hot = labels[:, None] == np.arange(probs.shape[1])[None, :]
    return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


def _at_threshold(scores: np.ndarray, positive: np.ndarray, threshold: float | None) -> dict:
    """Sensitivity and specificity when a case is called positive at ``score >= threshold``."""
    called = scores >= threshold if threshold is not None else None
    sensitivity = specificity = None
    if called is not None and positive.any():
        sensitivity = float(called[positive].mean())
    if called is not None and (~positive).any():
        specificity = float((~called[~positive]).mean())
    return {"threshold": threshold, "sensitivity": sensitivity, "specificity": specificity}


FITTED_ON_WORDS = {FITTED_ON: "the validation split",
                   "oof": "the pooled out-of-fold predictions of the cross-validation"}


def fit(val_labels: np.ndarray, val_probs: np.ndarray, class_names: Sequence[str], *,
        fitted_on: str = FITTED_ON) -> dict:
    """What is fitted on the validation split (or ``fitted_on``, e.g. a cross-validation's
    out-of-fold predictions, ``"oof"``): ``{"fitted_on", "n_val", "temperature",
    "threshold", "statement"}`` (``threshold`` is None unless there are two classes)."""
    val_labels = np.asarray(val_labels, np.int64)
    val_probs = np.asarray(val_probs, np.float64)
    temperature = calibration.fit_temperature(val_labels, val_probs)
    threshold = None
    if len(class_names) == 2:
        points = metrics._operating_points(val_probs[:, 1], val_labels == 1,
                                           metrics.TARGET_SENSITIVITY)
        threshold = {"youden": points["youden"]["threshold"],
                     "at_sensitivity": points["at_sensitivity"]["threshold"],
                     "target_sensitivity": metrics.TARGET_SENSITIVITY}
    statement = (f"Probability calibration (temperature scaling, T = {temperature:.3f}) "
                 + ("and the decision thresholds (Youden; "
                    f"{100 * metrics.TARGET_SENSITIVITY:g} % sensitivity) were "
                    if threshold else "was ")
                 + f"fitted on {FITTED_ON_WORDS.get(fitted_on, fitted_on)} "
                 f"(n = {len(val_labels)}) and applied unchanged "
                 "to the test splits; AUCs are computed on the uncalibrated probabilities, and "
                 "temperature scaling never changes a predicted class.")
    return {"fitted_on": fitted_on, "n_val": int(len(val_labels)), "temperature": temperature,
            "threshold": threshold, "statement": statement}


def apply(fitted: dict, labels: np.ndarray, probs: np.ndarray) -> tuple[dict, np.ndarray]:
    """(the split's calibration entry, its calibrated probabilities [N, K])."""
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    calibrated = calibration.apply_temperature(probs, fitted["temperature"])
    entry = {
        "n": int(len(labels)),
        "ece": calibration.reliability(labels, probs)["ece"],
        "ece_calibrated": calibration.reliability(labels, calibrated)["ece"],
        "brier": _brier(labels, probs),
        "brier_calibrated": _brier(labels, calibrated),
    }
    if fitted["threshold"] is not None:
        positive = labels == 1
        entry["at_val_thresholds"] = {
            "youden": _at_threshold(probs[:, 1], positive, fitted["threshold"]["youden"]),
            "at_sensitivity": _at_threshold(probs[:, 1], positive,
                                            fitted["threshold"]["at_sensitivity"]),
        }
    return entry, calibrated


def not_fitted(reason: str) -> dict:
    """calibration.json when there is nothing to fit on (no or an empty validation split)."""
    return {"fitted_on": None, "n_val": 0, "temperature": None, "threshold": None,
            "statement": f"Not calibrated: {reason}. Probabilities are reported as the model "
                         "gives them.", "splits": {}}
