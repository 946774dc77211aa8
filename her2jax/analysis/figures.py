"""The report's figures: ROC curves (one-vs-rest, micro, macro, pairwise), the confusion
matrix and the training curves, as PNG files.

Every curve follows :mod:`her2jax.evaluate.metrics`, so a legend's AUC is the number in
metrics.json:

* **one-vs-rest** ROC of class k: class k positive, scored by ``probs[:, k]``.
* **micro-average**: the one-hot labels flattened against the flattened probabilities; for two
  classes the positive class (column 1) against class 0, as metrics.py defines it.
* **macro-average**: the mean true-positive rate of the classes present, on the union of their
  false-positive rates. A ROC curve can rise vertically at one false-positive rate, so each
  class is evaluated at both ends of every such jump (left and right limits); the mean curve's
  trapezoidal area is then exactly the mean of the per-class AUCs, metrics.py's macro AUC.
* **pairwise** ROC of classes i < j: the cases of the two classes, class j positive, scored by
  ``p_j / (p_i + p_j)`` (computed as metrics.py does, ``(p_j - p_i) / (p_i + p_j)``, 0 when both
  are 0: the same order).

A curve that is undefined in a split (its positive or negative class absent) is not drawn; the
legend lists it as "not in this split" and the returned dict has None for it.

Figures use Matplotlib's object API on the Agg canvas (no display, no pyplot state) and are
written atomically (``files.write_figure``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from her2jax.errors import Her2jaxError
from her2jax.evaluate import files

MICRO = "micro-average"
MACRO = "macro-average"
_DPI = 100


def _check(labels, probs, class_names) -> tuple[np.ndarray, np.ndarray, list[str]]:
    class_names = [str(name) for name in class_names]
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    if k < 2:
        raise Her2jaxError(f"need at least 2 class names, got {class_names}", key="class_names")
    if probs.ndim != 2 or probs.shape != (len(labels), k):
        raise Her2jaxError(f"need labels [N] and probs [N, {k}], got shapes {labels.shape} and "
                           f"{probs.shape}", key="probs")
    if np.any((labels < 0) | (labels >= k)):
        raise Her2jaxError(f"labels must lie in [0, {k}) (unlabelled cases left out)",
                           key="labels")
    return labels, probs, class_names


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def _roc(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(fpr, tpr, auc) of one binary problem, None when a side is empty."""
    from sklearn.metrics import auc, roc_curve

    positive = np.asarray(positive, dtype=bool)
    if not (positive.any() and (~positive).any()):
        return None
    fpr, tpr, _ = roc_curve(positive, scores)
    return fpr, tpr, float(auc(fpr, tpr))


def _limits(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve's left and right limits at each grid point (they differ at vertical jumps).

    Between two distinct false-positive rates the curve is the segment from the top of the
    first to the bottom of the second.
    """
    xs, first = np.unique(fpr, return_index=True)
    last = np.r_[first[1:], len(fpr)] - 1
    bottom, top = tpr[first], tpr[last]
    index = np.clip(np.searchsorted(xs, grid, side="left"), 0, len(xs) - 1)
    exact = xs[index] == grid
    before = np.maximum(index - 1, 0)
    span = xs[index] - xs[before]
    fraction = np.divide(grid - xs[before], span, out=np.zeros_like(grid), where=span > 0)
    between = top[before] + fraction * (bottom[index] - top[before])
    return np.where(exact, bottom[index], between), np.where(exact, top[index], between)


def macro_curve(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The macro-average ROC: the mean TPR of ``curves`` [(fpr, tpr), ...] on the union of their
    FPRs, each point twice (left then right limit), so that its area is the mean of theirs."""
    grid = np.unique(np.concatenate([fpr for fpr, _ in curves]))
    left, right = zip(*(_limits(fpr, tpr, grid) for fpr, tpr in curves), strict=True)
    mean_left, mean_right = np.mean(left, axis=0), np.mean(right, axis=0)
    return np.repeat(grid, 2), np.column_stack([mean_left, mean_right]).ravel()


def _absent(ax, text: str) -> str:
    """A legend entry (an invisible line) for a curve that is not drawn."""
    ax.plot([], [], linestyle="none", label=text)
    return text


def _finish_roc(fig, ax, title: str) -> None:
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(title, fontsize=10)
    # Below the axes, so that no curve is hidden behind it.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)


def plot_roc(path, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Writes a PNG of the one-vs-rest ROC of every class with the micro- and macro-average.

    With two classes one curve is drawn: the positive class (column 1) against class 0, whose
    AUC is both the micro and the macro AUC (metrics.py's binary convention).

    Args:
      path: the PNG to write (its folder is created).
      labels: [N] int true classes in [0, K) (leave unlabelled cases out).
      probs: [N, K] float predicted probabilities.
      class_names: the K names, in column order.

    Returns:
      ``{"auc": {class name, "micro-average", "macro-average": float | None}, "legend":
      [legend text, ...]}``; None (and a "not in this split" legend entry) for an undefined
      curve.
    """
    labels, probs, class_names = _check(labels, probs, class_names)
    k = len(class_names)
    fig = _figure((5.0, 5.0))
    ax = fig.add_subplot()
    aucs: dict[str, float | None] = {}
    legend: list[str] = []
    present = [c for c in range(k) if np.any(labels == c)]
    if k == 2:
        curve = _roc(probs[:, 1], labels == 1)
        name = f"{class_names[1]} vs {class_names[0]}"
        if curve is None:
            legend.append(_absent(ax, f"{name}: only one class in this split (no curve)"))
            aucs = dict.fromkeys([*class_names, MICRO, MACRO])
        else:
            fpr, tpr, value = curve
            legend.append(f"{name} (AUC {value:.3f})")
            ax.plot(fpr, tpr, color=_palette(1)[0], linewidth=2, label=legend[-1])
            aucs = dict.fromkeys([*class_names, MICRO, MACRO], value)
        _finish_roc(fig, ax, f"ROC, n={len(labels)} (binary: micro = macro = this AUC)")
        files.write_figure(path, fig, bbox_inches="tight")
        return {"auc": aucs, "legend": legend}

    drawn = []
    for c, (name, color) in enumerate(zip(class_names, _palette(k), strict=True)):
        curve = _roc(probs[:, c], labels == c)
        if curve is None:
            aucs[name] = None
            why = "not in this split" if c not in present else "the only class in this split"
            legend.append(_absent(ax, f"{name}: {why} (no curve)"))
            continue
        fpr, tpr, value = curve
        aucs[name] = value
        drawn.append((fpr, tpr))
        legend.append(f"{name} vs rest (AUC {value:.3f})")
        ax.plot(fpr, tpr, color=color, linewidth=1.5, label=legend[-1])
    aucs[MICRO] = aucs[MACRO] = None
    if len(present) >= 2:
        one_hot = labels[:, None] == np.arange(k)[None, :]
        fpr, tpr, value = _roc(probs.ravel(), one_hot.ravel())
        aucs[MICRO] = value
        legend.append(f"{MICRO} (AUC {value:.3f})")
        ax.plot(fpr, tpr, color="black", linestyle="--", linewidth=1.5, label=legend[-1])
        fpr, tpr = macro_curve(drawn)
        aucs[MACRO] = float(np.trapezoid(tpr, fpr))
        legend.append(f"{MACRO} (AUC {aucs[MACRO]:.3f})")
        ax.plot(fpr, tpr, color="dimgray", linestyle="-.", linewidth=1.5, label=legend[-1])
    else:
        legend.append(_absent(ax, "micro- and macro-average: fewer than 2 classes (no curve)"))
    _finish_roc(fig, ax, f"ROC one-vs-rest, n={len(labels)}")
    files.write_figure(path, fig, bbox_inches="tight")
    return {"auc": aucs, "legend": legend}


def pairs(k: int) -> list[tuple[int, int]]:
    """Class index pairs (i, j), i < j, neighbours first (metrics.py's pairwise order)."""
    return [(i, i + gap) for gap in range(1, k) for i in range(k - gap)]


def plot_pairwise_roc(path, labels: np.ndarray, probs: np.ndarray,
                      class_names: Sequence[str]) -> dict:
    """Writes a PNG of the one-vs-one ROC of every class pair (metrics.py's pairwise AUC).

    Args:
      path: the PNG to write (its folder is created).
      labels: [N] int true classes in [0, K).
      probs: [N, K] float predicted probabilities.
      class_names: the K names, in column order.

    Returns:
      ``{"auc": {"<i> vs <j>": float | None}, "legend": [legend text, ...]}``.
    """
    labels, probs, class_names = _check(labels, probs, class_names)
    fig = _figure((5.0, 5.0))
    ax = fig.add_subplot()
    aucs: dict[str, float | None] = {}
    legend: list[str] = []
    for (i, j), color in zip(pairs(len(class_names)), _palette(len(class_names) ** 2),
                             strict=False):
        name = f"{class_names[i]} vs {class_names[j]}"
        members = np.flatnonzero((labels == i) | (labels == j))
        p_i, p_j = probs[members, i], probs[members, j]
        score = np.divide(p_j - p_i, p_i + p_j, out=np.zeros(len(members)), where=p_i + p_j > 0)
        curve = _roc(score, labels[members] == j)
        if curve is None:
            aucs[name] = None
            missing = [class_names[c] for c in (i, j) if not np.any(labels == c)]
            legend.append(_absent(ax, f"{name}: no {' or '.join(missing)} in this split "
                                      "(no curve)"))
            continue
        fpr, tpr, value = curve
        aucs[name] = value
        legend.append(f"{name} (AUC {value:.3f})")
        ax.plot(fpr, tpr, color=color, linewidth=1.5, label=legend[-1])
    _finish_roc(fig, ax, f"ROC one-vs-one (second class positive), n={len(labels)}")
    files.write_figure(path, fig, bbox_inches="tight")
    return {"auc": aucs, "legend": legend}


def plot_confusion(path, confusion, class_names: Sequence[str]) -> dict:
    """Writes a PNG of the confusion matrix: counts, and percent of each true class (row).

    Args:
      path: the PNG to write (its folder is created).
      confusion: [K, K] int counts, rows true, columns predicted (metrics.json's).
      class_names: the K names.

    Returns:
      ``{"counts": [[int]], "percent": [[float | None]], "annotations": [[str]]}``: the cell
      texts as drawn; a row with no case has no percentages (None, drawn as "-").
    """
    class_names = [str(name) for name in class_names]
    counts = np.asarray(confusion, dtype=np.int64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise Her2jaxError(f"confusion matrix must be [{k}, {k}], got {counts.shape}",
                           key="confusion_matrix")
    totals = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    percent = [[float(100 * fraction[r, c]) if totals[r, 0] else None for c in range(k)]
               for r in range(k)]
    annotations = [[f"{counts[r, c]}\n" + (f"{percent[r][c]:.0f}%" if percent[r][c] is not None
                                          else "-") for c in range(k)] for r in range(k)]
    side = 1.8 + 1.0 * k
    fig = _figure((side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    for r in range(k):
        for c in range(k):
            ax.text(c, r, annotations[r][c], ha="center", va="center", fontsize=10,
                    color="white" if fraction[r, c] > 0.55 else "black")
    ax.set_xticks(range(k), class_names, rotation=20, ha="right")
    ax.set_yticks(range(k), [f"{name}\n(n={int(totals[r, 0])})"
                             for r, name in enumerate(class_names)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix, n={int(counts.sum())}\n(count, % of true class)",
                 fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    files.write_figure(path, fig)
    return {"counts": counts.tolist(), "percent": percent, "annotations": annotations}



def _finite_any(values) -> bool:
    return values is not None and bool(np.any(np.isfinite(values)))


def plot_training_curves(path, curves: dict[str, dict[str, np.ndarray]], *, num_classes: int,
                         checkpoint_steps: Sequence[int] = ()) -> dict:
    """Writes a PNG of a run's training curves: loss by step (training, and validation when
    logged) beside the validation macro AUC by step, with chance levels and the evaluated
    checkpoint.

    Missing values (NaN) break a curve rather than being bridged; every point has a marker,
    so a value between two missing ones still shows.

    Args:
      path: the PNG to write (its folder is created).
      curves: ``{split: {"step": [R] int, name: [R] float}}`` (``report.read_curves``): the
        ``train`` split's ``loss``, the ``val`` split's ``macro_auc`` and, when logged, its
        ``loss``; NaN where a record has no finite value.
      num_classes: K, for the chance loss ln K (the cross-entropy of a uniform prediction,
        weighted or not).
      checkpoint_steps: the evaluated checkpoint's step(s), each drawn as a vertical line.

    Returns:
      ``{"loss": [legend text, ...], "auc": [legend text, ...]}``: the legends of the two
      panels as drawn (a note for a curve with no finite value).
    """
    def series(split: str, name: str):
        part = curves.get(split) or {}
        if name not in part:
            return None, None
        return (np.asarray(part["step"], dtype=np.int64),
                np.asarray(part[name], dtype=np.float64))

    fig = _figure((10.0, 4.4))
    loss_ax, auc_ax = fig.subplots(1, 2, sharex=True)
    colors = _palette(3)
    legends: dict[str, list[str]] = {"loss": [], "auc": []}

    for (split, label, marker), color in zip(
            [("train", "training loss", "o"), ("val", "validation loss", "s")], colors,
            strict=False):
        steps, values = series(split, "loss")
        if _finite_any(values):
            loss_ax.plot(steps, values, color=color, marker=marker, markersize=3,
                         linewidth=1.3, label=label)
            legends["loss"].append(label)
        elif split == "train" or values is not None:
            legends["loss"].append(_absent(loss_ax, f"{label}: no finite value logged"))
    chance = float(np.log(num_classes))
    legends["loss"].append(f"chance: ln {num_classes} = {chance:.3f}")
    loss_ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=legends["loss"][-1])
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.set_title("Loss by step", fontsize=10)

    steps, values = series("val", "macro_auc")
    if _finite_any(values):
        auc_ax.plot(steps, values, color=colors[2], marker="o", markersize=4, linewidth=1.3,
                    label="validation macro AUC")
        legends["auc"].append("validation macro AUC")
    else:
        why = "no validation record" if values is None else "undefined at every evaluation"
        legends["auc"].append(_absent(auc_ax, f"validation macro AUC: {why}"))
    legends["auc"].append("chance (0.5)")
    auc_ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label=legends["auc"][-1])
    auc_ax.set_ylim(0, 1.02)
    auc_ax.set_ylabel("macro AUC")
    auc_ax.set_title("Validation macro AUC by step", fontsize=10)

    for ax, legend in ((loss_ax, legends["loss"]), (auc_ax, legends["auc"])):
        for step in sorted(set(checkpoint_steps)):
            legend.append(f"evaluated checkpoint (step {step})")
            ax.axvline(step, color="tab:red", linestyle="-.", linewidth=1.2, label=legend[-1])
        ax.set_xlabel("step")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    files.write_figure(path, fig, bbox_inches="tight")
    return legends
