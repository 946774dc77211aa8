"""Calibration: reliability (ECE), the reliability diagram and temperature scaling.

Calibration is fitted on the validation split and applied unchanged to the test split:
``T = fit_temperature(val_labels, val_probs)`` then ``apply_temperature(test_probs, T)``. Fitting
on the test split would leak its labels into the reported test metrics.

Binning: ``n_bins`` equal-width bins on [0, 1]; a confidence ``c`` falls in bin
``min(floor(c * n_bins), n_bins - 1)``, i.e. bins are ``[lo, hi)`` and 1.0 joins the last bin.
The expected calibration error (ECE) is ``sum_b (n_b / N) |accuracy_b - confidence_b|`` over the
non-empty bins, with ``confidence`` the top-class probability and ``accuracy`` whether the argmax
is the true class (Guo et al. 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.optimize

from her2jax.errors import Her2jaxError
from her2jax.evaluate import files

# Probabilities are clipped here before the log that turns them into logits (a zero would give
# -inf and an infinite NLL).
_PROB_FLOOR = 1e-12
# log T is searched in [-_LOG_T_BOUND, _LOG_T_BOUND]: T in about [0.007, 148].
_LOG_T_BOUND = 5.0


def _check(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or labels.shape != (len(probs),):
        raise Her2jaxError(f"need labels [N] and probs [N, K], got shapes {labels.shape} and "
                           f"{probs.shape}", key="probs")
    if np.any((labels < 0) | (labels >= probs.shape[1])):
        raise Her2jaxError(f"labels must lie in [0, {probs.shape[1]})", key="labels")
    return labels, probs


def _bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    return np.clip(np.floor(values * n_bins).astype(np.int64), 0, n_bins - 1)


def _curve(values: np.ndarray, hits: np.ndarray, n_bins: int) -> dict:
    """Per-bin mean of ``values``, mean of ``hits`` and count (None for empty bins)."""
    index = _bins(values, n_bins)
    count = np.bincount(index, minlength=n_bins)
    value_sum = np.bincount(index, weights=values, minlength=n_bins)
    hit_sum = np.bincount(index, weights=hits.astype(np.float64), minlength=n_bins)
    mean_value = [float(s / c) if c else None for s, c in zip(value_sum, count, strict=True)]
    mean_hit = [float(s / c) if c else None for s, c in zip(hit_sum, count, strict=True)]
    return {"confidence": mean_value, "accuracy": mean_hit, "count": count.tolist()}


def reliability(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict:
    """Reliability of the top-class confidence (and of each class's probability), with the ECE.

    Args:
      labels: [N] int true classes in [0, K).
      probs: [N, K] float probabilities.
      n_bins: equal-width bins on [0, 1] (see the module docstring for the edges).

    Returns:
      ``{"n_bins", "bin_edges", "confidence", "accuracy", "count", "ece", "per_class"}``:
      ``confidence`` / ``accuracy`` / ``count`` are per-bin lists of the top-class confidence,
      the fraction of argmax-correct cases and the number of cases (None for an empty bin);
      ``ece`` is a float (None when N == 0); ``per_class`` is one
      ``{"confidence", "accuracy", "count"}`` per class, binning ``probs[:, k]`` against
      ``labels == k`` (``accuracy`` is then the observed frequency of class k).
    """
    labels, probs = _check(labels, probs)
    if n_bins < 1:
        raise Her2jaxError(f"n_bins must be >= 1, got {n_bins}", key="n_bins")
    n = len(labels)
    confidence = probs.max(axis=1) if n else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels) if n else np.zeros(0, dtype=bool)
    top = _curve(confidence, correct, n_bins)
    ece = None
    if n:
        parts = zip(top["count"], top["accuracy"], top["confidence"], strict=True)
        ece = float(sum(c / n * abs(a - m) for c, a, m in parts if c))
    return {
        "n_bins": int(n_bins),
        "bin_edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        **top,
        "ece": ece,
        "per_class": [_curve(probs[:, k], labels == k, n_bins) for k in range(probs.shape[1])],
    }


def plot_reliability(path: str | Path, labels: np.ndarray, probs: np.ndarray,
                     class_names: Sequence[str], n_bins: int = 10) -> None:
    """Write a PNG reliability diagram: top-class and per-class curves over a confidence histogram.

    Args:
      path: the PNG to write (parent folders are created).
      labels: [N] int true classes.
      probs: [N, K] float probabilities (calibrated with the validation-fitted T, if any).
      class_names: K names, in column order.
      n_bins: equal-width bins on [0, 1].
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = reliability(labels, probs, n_bins)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")

    def draw(curve, **style):
        pairs = zip(curve["confidence"], curve["accuracy"], strict=True)
        points = [(c, a) for c, a in pairs if c is not None]
        if points:
            x, y = zip(*points, strict=True)
            ax.plot(x, y, marker="o", **style)

    ece = curves["ece"]
    draw(curves, color="black", linewidth=2,
         label=f"top class (ECE {ece:.3f})" if ece is not None else "top class")
    for name, curve in zip(class_names, curves["per_class"], strict=True):
        draw(curve, linewidth=1, alpha=0.8, label=str(name))
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Reliability")
    top = np.asarray(probs, dtype=np.float64).max(axis=1) if len(probs) else np.zeros(0)
    hist.hist(top, bins=curves["bin_edges"], color="steelblue", edgecolor="white")
    hist.set_xlabel("predicted probability (histogram: top-class confidence)")
    hist.set_ylabel("cases")
    fig.tight_layout()
    files.write_figure(path, fig, dpi=100)
    plt.close(fig)


def _as_logits(logits_or_probs: np.ndarray) -> np.ndarray:
    """Logits as given, or ``log p`` when every row is a probability vector."""
    values = np.asarray(logits_or_probs, dtype=np.float64)
    if values.size and np.all(values >= 0) and np.allclose(values.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.clip(values, _PROB_FLOOR, None))
    return values


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fit_temperature(labels: np.ndarray, logits_or_probs: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` on the validation split.

    Fit on validation, then apply the same T unchanged to the test split (``apply_temperature``).
    Probabilities (rows non-negative, summing to 1) are turned into logits with ``log p``
    (clipped at 1e-12): softmax(log p) = p, so T = 1 leaves them unchanged. The search is a
    bounded scalar minimisation (``scipy.optimize.minimize_scalar``) over log T in [-5, 5].

    Args:
      labels: [N] int validation labels.
      logits_or_probs: [N, K] float logits, or probabilities.

    Returns:
      T as a float (1.0 when N == 0). T > 1 softens over-confident predictions.
    """
    logits = _as_logits(logits_or_probs)
    labels, logits = _check(labels, logits)
    if not len(labels):
        return 1.0
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-_log_softmax(logits / math.exp(log_t))[rows, labels].mean())

    result = scipy.optimize.minimize_scalar(nll, bounds=(-_LOG_T_BOUND, _LOG_T_BOUND),
                                            method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """[N, K] probabilities ``softmax(log p / T)`` (T from ``fit_temperature`` on validation).

    Args:
      probs: [N, K] float probabilities (or logits: they are handled as ``fit_temperature`` does).
      temperature: T > 0.

    Returns:
      [N, K] float64 probabilities, rows summing to 1.
    """
    if not temperature > 0:
        raise Her2jaxError(f"temperature must be > 0, got {temperature}", key="temperature")
    logits = _as_logits(probs)
    return np.exp(_log_softmax(logits / temperature))
