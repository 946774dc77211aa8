"""Classification metrics with stratified-bootstrap confidence intervals (the metrics.json dict).

``summarize`` reports what the study reports (micro- and macro-average AUC with 95% CIs) plus
per-class one-vs-rest AUCs, pairwise one-vs-one AUCs, the confusion matrix and accuracies.

Definitions (K classes, probabilities ``probs[:, k]``):

* **per-class AUC** of class k: one-vs-rest, class k positive, scored by ``probs[:, k]``.
* **macro AUC**: the unweighted mean of the per-class AUCs (scikit-learn's
  ``roc_auc_score(labels, probs, multi_class='ovr', average='macro')``). When a class is absent
  from the labels its AUC is undefined; the macro AUC is then the mean over the classes present
  (scikit-learn refuses such input).
* **micro AUC**: the AUC of the one-hot labels flattened against the flattened probabilities
  (scikit-learn's ``average='micro'``), as the study reports it.
* **binary (K == 2)**: micro and macro AUC are both the AUC of the positive class (column 1)
  against class 0, the conventional binary AUC (the flattened micro AUC would mix the two
  complementary columns). Both per-class AUCs equal it when rows sum to 1.
* **pairwise AUC** of classes i < j ("<i> vs <j>"): one-vs-one on the cases of classes i and j
  only, class j positive, scored by ``p_j / (p_i + p_j)`` (0.5 when both are 0; computed as the
  equivalent ``(p_j - p_i) / (p_i + p_j)``). Normalising by ``p_i + p_j`` makes the two
  directions of Hand & Till (2001) coincide (``p_i / (p_i + p_j) = 1 - p_j / (p_i + p_j)``, and
  in the difference form the swap is an exact negation, so they agree to the last bit), hence
  one number per pair. Hand & Till (and scikit-learn's ``multi_class='ovo'``) instead average
  the two directions scored by the raw ``p_i`` and ``p_j``, which can differ slightly. Pairs are
  listed neighbours first: for three classes ``zero vs low``, ``low vs positive``,
  ``zero vs positive``.

Confidence intervals: stratified bootstrap -- each resample draws, with replacement, as many cases
from every true class as it has (class sizes preserved), ``n_boot`` resamples from
``numpy.random.default_rng(seed)`` (same inputs and seed, same intervals), percentile interval
at ``confidence``. Every resample's AUCs are computed at once from per-case resampling counts (a
weighted Mann-Whitney statistic over one sort of the scores), so 2,000 resamples of 500 cases
take about 0.1 s. A resample whose AUC is undefined (no positive or no negative case) is skipped
and counted in ``summary['bootstrap']['skipped']``; if more than half of the resamples are
skipped the interval is NaN (``null`` in metrics.json). Because class sizes are preserved, a
resample of an AUC whose point estimate is defined is always defined, so with stratification
nothing is skipped in practice; the rule guards the general case.

Further metrics (argmax predictions; plain floats, None when undefined):

* **macro_f1**: mean of 2 TP / (2 TP + FP + FN) over the classes that are true or predicted at
  least once (scikit-learn's ``f1_score(average='macro')``).
* **quadratic_weighted_kappa**: Cohen's kappa with weights (i - j)^2 over the class order
  (scikit-learn's ``cohen_kappa_score(weights='quadratic')``, also for K == 2); None when the
  expected disagreement is 0 (every true and predicted class the same).
* **brier**: multi-class Brier score, the mean over cases of ``sum_k (p_k - y_k)^2`` (in [0, 2]).
* **ece**: expected calibration error of the top-class confidence over 10 equal-width bins
  ``[lo, hi)`` (``calibration.reliability``).
* **per_class_auc_delong**: the one-vs-rest AUCs with DeLong's variance (fast midrank algorithm
  of Sun & Xu 2014) and the normal interval AUC +- z SE on the AUC scale (not logit), clipped
  to [0, 1]; NaN ends when a class has fewer than 2 positives or negatives.
* **binary** (K == 2 only, else None): ``auc`` (= macro_auc, bootstrap CI), ``auc_delong``, and
  operating points on p(positive), a case called positive when ``p >= threshold``: ``youden``
  (max sensitivity + specificity - 1, highest threshold on ties) and ``at_sensitivity`` (the
  highest threshold reaching sensitivity ``target`` = 0.9), each with the sensitivity and
  specificity it achieves.

BCa (``ci_method='bca'``): the same stratified resamples; bias correction
``z0 = Phi^-1(fraction of resampled values below the estimate, ties one half)``; acceleration
from a stratified jackknife over cases (every case left out once, each AUC recomputed at once
from weights like the bootstrap's; per-class sums as in scipy.stats.bootstrap's multi-sample
BCa, which it matches). The jackknife is O(N^2), so above ``BCA_MAX_N`` (2,000) cases
percentile intervals are reported and ``bootstrap['note']`` says so. Where z0 is infinite (no
resample on one side of the estimate) that metric keeps its percentile interval.

Undefined values: an AUC whose positive or negative class is absent from the labels is
``{"value": None, "ci_low": None, "ci_high": None}`` (the shape stays the same, so a reader can
always index ``["value"]``); micro and macro AUC are None when fewer than two classes are present.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import ndtr, ndtri
from tqdm import tqdm

from her2jax.errors import Her2jaxError
from her2jax.evaluate.calibration import reliability

# Bootstrap weights are processed in chunks of at most this many (resample, item) entries, to
# bound memory for large cohorts (the micro AUC has N * K items per resample).
_CHUNK_ENTRIES = 4_000_000
_ROW_SUM_TOLERANCE = 1e-3
# BCa's acceleration needs a jackknife (N leave-one-out AUCs per metric, O(N^2) work); above
# this many cases summarize falls back to percentile intervals and says so in a note.
BCA_MAX_N = 2000
CI_METHODS = ("percentile", "bca")
# The binary block's high-sensitivity operating point.
TARGET_SENSITIVITY = 0.9


class _Auc:
    """One AUC problem, prepared once so that every bootstrap resample reuses one sort.

    An item is one (case, score, positive?) triple; a case can own several items (the micro AUC
    has K items per case). ``evaluate`` takes per-case weights -- bootstrap counts -- and returns
    the weighted Mann-Whitney statistic: over positive items, the weight of negatives scored
    lower plus half the weight of negatives tied with it (ties count one half, as in the AUC).
    """

    def __init__(self, scores: np.ndarray, positive: np.ndarray, case_index: np.ndarray):
        positive = np.asarray(positive, dtype=bool)
        order = np.argsort(scores[~positive], kind="stable")
        negative_scores = scores[~positive][order]
        self.negative_cases = case_index[~positive][order]
        self.positive_cases = case_index[positive]
        # Negatives strictly below / at most each positive's score: indices into the
        # zero-prefixed cumulative negative weight.
        self.below = np.searchsorted(negative_scores, scores[positive], side="left")
        self.up_to = np.searchsorted(negative_scores, scores[positive], side="right")
        self.ties = not np.array_equal(self.below, self.up_to)
        self.defined = bool(len(self.positive_cases) and len(self.negative_cases))

    def evaluate(self, case_weights: np.ndarray) -> np.ndarray:
        """AUC for each row of ``case_weights`` [B, N]; returns [B], NaN where undefined."""
        w_pos = case_weights[:, self.positive_cases]
        cumulative = np.zeros((len(case_weights), len(self.negative_cases) + 1))
        np.cumsum(case_weights[:, self.negative_cases], axis=1, out=cumulative[:, 1:])
        lower = cumulative[:, self.below]
        if self.ties:
            lower = 0.5 * (lower + cumulative[:, self.up_to])
        numerator = np.sum(w_pos * lower, axis=1)
        denominator = w_pos.sum(axis=1) * cumulative[:, -1]
        out = np.full(len(case_weights), np.nan)
        np.divide(numerator, denominator, out=out, where=denominator > 0)
        return out


def _validate(labels, probs, class_names) -> tuple[np.ndarray, np.ndarray, list[str]]:
    class_names = [str(name) for name in class_names]
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    k = len(class_names)
    if k < 2:
        raise Her2jaxError(f"need at least 2 class names, got {class_names}", key="class_names")
    if probs.ndim != 2 or probs.shape[1] != k:
        raise Her2jaxError(f"probs must be [N, {k}] (one column per class name), "
                           f"got shape {probs.shape}", key="probs")
    if labels.shape != (len(probs),):
        raise Her2jaxError(f"labels must be [N] with N = {len(probs)} rows of probs, "
                           f"got shape {labels.shape}", key="labels")
    if labels.size and not np.all(np.equal(np.mod(labels, 1), 0)):
        raise Her2jaxError("labels must be integer class indices", key="labels")
    labels = labels.astype(np.int64)
    if np.any((labels < 0) | (labels >= k)):
        bad = sorted(set(labels[(labels < 0) | (labels >= k)].tolist()))
        raise Her2jaxError(f"labels must lie in [0, {k}); found {bad}", key="labels")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise Her2jaxError("probs must be finite and non-negative", key="probs")
    row_sums = probs.sum(axis=1)
    if np.any(np.abs(row_sums - 1.0) > _ROW_SUM_TOLERANCE):
        worst = float(row_sums[np.argmax(np.abs(row_sums - 1.0))])
        raise Her2jaxError(f"probs rows must sum to 1 (a row sums to {worst:.6g}); "
                           "pass probabilities, not logits", key="probs")
    return labels, probs, class_names


def _stratified_counts(rng: np.random.Generator, by_class: list[np.ndarray], n: int,
                       size: int) -> np.ndarray:
    """[size, n] float64 resampling counts: each class's cases drawn with replacement, n_k times."""
    counts = np.zeros((size, n))
    rows = np.arange(size)[:, None]
    for members in by_class:
        n_k = len(members)
        if n_k == 0:
            continue
        draws = rng.integers(0, n_k, size=(size, n_k)) + rows * n_k
        counts[:, members] = np.bincount(draws.ravel(), minlength=size * n_k).reshape(size, n_k)
    return counts


def _none_entry() -> dict:
    return {"value": None, "ci_low": None, "ci_high": None}


def _midrank(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their mean rank (Sun & Xu 2014's midranks)."""
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]] if len(x) else np.zeros(0, dtype=bool)
    first = np.flatnonzero(starts)
    end = np.r_[first[1:], len(x)]
    out = np.empty(len(x))
    out[order] = ((first + 1 + end) / 2.0)[np.cumsum(starts) - 1]
    return out


def _delong(scores: np.ndarray, positive: np.ndarray, z: float) -> dict:
    """AUC with DeLong's interval, by the fast midrank algorithm of Sun & Xu (2014).

    With m positives X and n negatives Y, the structural components are
    ``V10_i = (T_Z(X_i) - T_X(X_i)) / n`` (the fraction of negatives below positive i, ties one
    half) and ``V01_j = 1 - (T_Z(Y_j) - T_Y(Y_j)) / m``, where T_X, T_Y, T_Z are midranks within
    X, within Y and within both. AUC = mean(V10); Var = S10 / m + S01 / n with S the sample
    variances (ddof 1). The interval is AUC +- z SE on the AUC scale, clipped to [0, 1]; it is
    NaN when m or n is below 2 (no variance).
    """
    positive = np.asarray(positive, dtype=bool)
    x, y = scores[positive], scores[~positive]
    m, n = len(x), len(y)
    if not (m and n):
        return _none_entry()
    t_z = _midrank(np.concatenate([x, y]))
    v10 = (t_z[:m] - _midrank(x)) / n
    v01 = 1.0 - (t_z[m:] - _midrank(y)) / m
    auc = float(v10.mean())
    if m < 2 or n < 2:
        return {"value": auc, "ci_low": math.nan, "ci_high": math.nan}
    se = math.sqrt(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    return {"value": auc, "ci_low": float(max(0.0, auc - z * se)),
            "ci_high": float(min(1.0, auc + z * se))}


def _operating_points(scores: np.ndarray, positive: np.ndarray, target: float) -> dict:
    """Youden and at-sensitivity operating points; a case is called positive when score >= t.

    Candidate thresholds are the distinct scores. Youden's threshold maximises
    sensitivity + specificity - 1 (the highest such threshold on ties); the at-sensitivity
    threshold is the highest one whose sensitivity is at least ``target`` (so the most
    specific), reported with the sensitivity and specificity it achieves.
    """
    none = {"threshold": None, "sensitivity": None, "specificity": None}
    pos, neg = np.sort(scores[positive]), np.sort(scores[~positive])
    if not (len(pos) and len(neg)):
        return {"youden": none, "at_sensitivity": {"target": target, **none}}
    thresholds = np.unique(scores)[::-1]
    sensitivity = (len(pos) - np.searchsorted(pos, thresholds, side="left")) / len(pos)
    specificity = np.searchsorted(neg, thresholds, side="left") / len(neg)

    def point(i: int) -> dict:
        return {"threshold": float(thresholds[i]), "sensitivity": float(sensitivity[i]),
                "specificity": float(specificity[i])}

    youden = int(np.argmax(sensitivity + specificity - 1.0))
    reaching = int(np.flatnonzero(sensitivity >= target)[0])  # the lowest score reaches 1.0
    return {"youden": point(youden), "at_sensitivity": {"target": target, **point(reaching)}}


def _jackknife(problem: _Auc, n: int) -> np.ndarray:
    """[N] leave-one-case-out AUCs (weights 1 everywhere but 0 for the left-out case)."""
    out = np.empty(n)
    items = len(problem.positive_cases) + len(problem.negative_cases)
    chunk = max(1, _CHUNK_ENTRIES // max(1, n, items))
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        weights = np.ones((size, n))
        weights[np.arange(size), start + np.arange(size)] = 0.0
        out[start:start + size] = problem.evaluate(weights)
    return out


def _bca_ends(boot: np.ndarray, value: float, jack: np.ndarray, by_class: list[np.ndarray],
              alpha: float) -> tuple[float, float] | None:
    """BCa interval ends, or None when the bias correction is infinite (use the percentile one).

    Bias: ``z0 = Phi^-1(fraction of bootstrap values below the estimate)``, ties counting one
    half (as scipy.stats.bootstrap). Acceleration: the stratified jackknife -- within each true
    class j, ``U_i = (n_j - 1)(mean(theta_-i) - theta_-i)`` over its cases, and
    ``a = sum_j sum_i U^3 / n_j^3 / (6 (sum_j sum_i U^2 / n_j^2)^1.5)``, the multi-sample form
    scipy uses for independent samples. When the jackknife is undefined or constant, a = 0.
    """
    fraction = (np.sum(boot < value) + np.sum(boot <= value)) / (2.0 * len(boot))
    if not 0.0 < fraction < 1.0:
        return None
    z0 = ndtri(fraction)
    num = den = 0.0
    for members in by_class:
        if len(members) == 0:
            continue
        theta = jack[members]
        u = (len(members) - 1) * (theta.mean() - theta)
        num += np.sum(u ** 3) / len(members) ** 3
        den += np.sum(u ** 2) / len(members) ** 2
    accel = num / (6.0 * den ** 1.5) if den > 0 and math.isfinite(num / den ** 1.5) else 0.0
    z = ndtri(np.array([alpha, 1.0 - alpha]))
    levels = ndtr(z0 + (z0 + z) / (1.0 - accel * (z0 + z)))
    low, high = np.percentile(boot, 100.0 * levels)
    return float(low), float(high)


def _quadratic_kappa(confusion: np.ndarray) -> float | None:
    """Cohen's kappa with quadratic weights (i - j)^2 from a K x K confusion matrix."""
    n = confusion.sum()
    if not n:
        return None
    k = len(confusion)
    weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / n
    denominator = float(np.sum(weights * expected))
    if denominator == 0:
        return None
    return 1.0 - float(np.sum(weights * confusion)) / denominator


def _macro_f1(confusion: np.ndarray) -> float | None:
    """Mean F1 = 2 TP / (2 TP + FP + FN) over the classes that are true or predicted at least once
    (scikit-learn's ``f1_score(average='macro')`` default label set)."""
    true, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    seen = (true + predicted) > 0
    if not seen.any():
        return None
    f1 = 2.0 * np.diag(confusion)[seen] / (true + predicted)[seen]
    return float(f1.mean())


def summarize(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], *,
              n_boot: int = 2000, seed: int = 0, confidence: float = 0.95,
              ci_method: str = "percentile", progress: str | None = None) -> dict:
    """The metrics.json dict: AUCs with stratified-bootstrap CIs, confusion matrix, accuracies.

    Args:
      labels: [N] int, true class indices in [0, K).
      probs: [N, K] float, predicted class probabilities (rows sum to 1).
      class_names: K names, in column order (e.g. ``labels.CLASS_NAMES['her2_3class']``).
      n_boot: bootstrap resamples (0: no intervals, the CI ends are NaN).
      seed: seed of the bootstrap's ``numpy.random.Generator``.
      confidence: the interval's level, in (0, 1).
      ci_method: ``"percentile"`` or ``"bca"`` (bias-corrected and accelerated; falls back to
        percentile, with a note, above ``BCA_MAX_N`` cases).
      progress: a label to show a bootstrap progress bar under (stderr); None for none.

    Returns:
      ``{"n", "class_names", "class_counts", "micro_auc", "macro_auc", "per_class_auc",
      "pairwise_auc", "per_class_auc_delong", "confusion_matrix", "accuracy",
      "balanced_accuracy", "macro_f1", "quadratic_weighted_kappa", "brier", "ece", "binary",
      "bootstrap"}``: every AUC is ``{"value", "ci_low", "ci_high"}`` (plain floats, or None
      when undefined); ``confusion_matrix`` is K x K ints, rows true, columns predicted (argmax);
      ``binary`` is None unless K == 2; ``bootstrap`` records ``method``, ``n_boot``, ``seed``,
      ``confidence``, ``skipped`` (resamples skipped per AUC, by metric name) and ``note``
      (None, or why BCa fell back to percentile). See the module docstring for definitions.

    Raises:
      Her2jaxError: shapes disagree, a label is out of range, or probs are not probabilities.
    """
    labels, probs, class_names = _validate(labels, probs, class_names)
    if not 0.0 < confidence < 1.0:
        raise Her2jaxError(f"confidence must lie in (0, 1), got {confidence}", key="confidence")
    if n_boot < 0:
        raise Her2jaxError(f"n_boot must be >= 0, got {n_boot}", key="n_boot")
    if ci_method not in CI_METHODS:
        raise Her2jaxError(f"ci_method must be one of {CI_METHODS}, got {ci_method!r}",
                           key="ci_method")
    n, k = probs.shape
    by_class = [np.flatnonzero(labels == c) for c in range(k)]
    present = [len(members) > 0 for members in by_class]
    cases = np.arange(n)

    # Every AUC as an _Auc problem; macro is derived from the per-class ones.
    problems: dict[str, _Auc] = {}
    per_class_keys = {name: f"per_class_auc/{name}" for name in class_names}
    for c, name in enumerate(class_names):
        problems[per_class_keys[name]] = _Auc(probs[:, c], labels == c, cases)
    pair_keys = {}
    pairs = [(i, i + gap) for gap in range(1, k) for i in range(k - gap)]
    for i, j in pairs:
        name = f"{class_names[i]} vs {class_names[j]}"
        pair_keys[name] = f"pairwise_auc/{name}"
        members = np.concatenate([by_class[i], by_class[j]])
        p_i, p_j = probs[members, i], probs[members, j]
        # (p_j - p_i) / (p_i + p_j) = 2 p_j / (p_i + p_j) - 1 ranks as p_j / (p_i + p_j), and
        # swapping i and j negates it exactly, so both directions give the same AUC bit for bit.
        score = np.divide(p_j - p_i, p_i + p_j, out=np.zeros(len(members)),
                          where=p_i + p_j > 0)
        problems[pair_keys[name]] = _Auc(score, labels[members] == j, members)
    enough_classes = sum(present) >= 2
    if enough_classes:
        if k == 2:
            problems["micro_auc"] = _Auc(probs[:, 1], labels == 1, cases)
        else:
            one_hot = labels[:, None] == np.arange(k)[None, :]
            problems["micro_auc"] = _Auc(probs.ravel(), one_hot.ravel(), np.repeat(cases, k))
    macro_parts = ([per_class_keys[class_names[1]]] if k == 2 else
                   [per_class_keys[name] for c, name in enumerate(class_names) if present[c]])
    defined = {key: problem for key, problem in problems.items() if problem.defined}

    values = {key: float(problem.evaluate(np.ones((1, n)))[0]) for key, problem in defined.items()}
    if enough_classes:
        values["macro_auc"] = float(np.mean([values[key] for key in macro_parts]))

    # Bootstrap: resampling counts in chunks, every AUC of a chunk from the same counts.
    samples: dict[str, list[np.ndarray]] = {key: [] for key in values}
    chunk = max(1, _CHUNK_ENTRIES // max(1, n * k))
    rng = np.random.default_rng(seed)
    done = 0
    # The bar counts AUCs x chunks of resamples (the chunks are what the draws depend on, so it
    # cannot split them further without changing the intervals).
    bar = tqdm(total=-(-n_boot // chunk) * len(defined), unit="AUC", leave=False,
               desc=f"bootstrap {progress or ''}".strip(), disable=progress is None)
    while done < n_boot and values:
        size = min(chunk, n_boot - done)
        counts = _stratified_counts(rng, by_class, n, size)
        for key, problem in defined.items():
            samples[key].append(problem.evaluate(counts))
            bar.update()
        if enough_classes:
            samples["macro_auc"].append(np.mean([samples[key][-1] for key in macro_parts], axis=0))
        done += size
    bar.close()

    note = None
    use_bca = ci_method == "bca" and n_boot > 0
    if use_bca and n > BCA_MAX_N:
        use_bca = False
        note = (f"bca requested but N = {n} > {BCA_MAX_N} (the jackknife is O(N^2)): "
                "percentile intervals reported")
    jack: dict[str, np.ndarray] = {}
    if use_bca:
        jack = {key: _jackknife(problem, n) for key, problem in defined.items()}
        if enough_classes:
            jack["macro_auc"] = np.mean([jack[key] for key in macro_parts], axis=0)

    alpha = (1.0 - confidence) / 2.0
    entries: dict[str, dict] = {}
    skipped: dict[str, int] = {}
    for key, value in values.items():
        boot = np.concatenate(samples[key]) if samples[key] else np.empty(0)
        finite = boot[np.isfinite(boot)]
        skipped[key] = int(n_boot - len(finite))
        if n_boot == 0 or skipped[key] > n_boot / 2:
            low = high = math.nan
        else:
            ends = _bca_ends(finite, value, jack[key], by_class, alpha) if use_bca else None
            if ends is None:
                ends = tuple(float(x) for x in
                             np.percentile(finite, [100 * alpha, 100 * (1 - alpha)]))
            low, high = ends
        entries[key] = {"value": value, "ci_low": low, "ci_high": high}

    z = float(ndtri(1.0 - alpha))
    delong = {name: _delong(probs[:, c], labels == c, z) for c, name in enumerate(class_names)}
    binary = None
    if k == 2:
        binary = {"auc": entries.get(per_class_keys[class_names[1]], _none_entry()),
                  "auc_delong": delong[class_names[1]],
                  **_operating_points(probs[:, 1], labels == 1, TARGET_SENSITIVITY)}

    predicted = np.argmax(probs, axis=1) if n else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    recalls = [confusion[c, c] / len(by_class[c]) for c in range(k) if present[c]]
    one_hot = (labels[:, None] == np.arange(k)[None, :]).astype(np.float64)

    return {
        "n": int(n),
        "class_names": list(class_names),
        "class_counts": {name: len(by_class[c]) for c, name in enumerate(class_names)},
        "micro_auc": entries.get("micro_auc", _none_entry()),
        "macro_auc": entries.get("macro_auc", _none_entry()),
        "per_class_auc": {name: entries.get(key, _none_entry())
                          for name, key in per_class_keys.items()},
        "pairwise_auc": {name: entries.get(key, _none_entry()) for name, key in pair_keys.items()},
        "per_class_auc_delong": delong,
        "confusion_matrix": confusion.tolist(),
        "accuracy": float(np.trace(confusion) / n) if n else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "macro_f1": _macro_f1(confusion),
        "quadratic_weighted_kappa": _quadratic_kappa(confusion),
        "brier": float(np.mean(np.sum((probs - one_hot) ** 2, axis=1))) if n else None,
        "ece": reliability(labels, probs, n_bins=10)["ece"],
        "binary": binary,
        "bootstrap": {"method": "stratified bca" if use_bca else "stratified percentile",
                      "n_boot": int(n_boot), "seed": int(seed), "confidence": float(confidence),
                      "skipped": skipped, "note": note},
    }


def balanced_log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Class-balanced cross-entropy: the mean over the classes present of the mean
    ``-log p(true class)`` of their cases (probabilities floored at 1e-7).

    Every class counts equally, as in training with 'balanced' class weights, and every case
    counts, which makes it a steadier selection criterion than an AUC on a small split.

    Args:
      labels: [N] int class indices.
      probs: [N, K] probabilities.

    Returns:
      The loss (NaN for an empty split).
    """
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    if not len(labels):
        return float("nan")
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))
    return float(np.mean([nll[labels == c].mean() for c in np.unique(labels)]))


def format_auc(entry: dict, *, digits: int = 3, confidence: float = 0.95) -> str:
    """``{"value", "ci_low", "ci_high"}`` as the study prints it: ``0.833 (95% CI 0.818–0.847)``.

    An undefined value prints ``n/a``; an undefined interval ``0.833 (95% CI n/a)``.
    """
    def defined(x) -> bool:
        return x is not None and math.isfinite(x)

    value, low, high = entry.get("value"), entry.get("ci_low"), entry.get("ci_high")
    if not defined(value):
        return "n/a"
    level = f"{100 * confidence:g}% CI"
    if not (defined(low) and defined(high)):
        return f"{value:.{digits}f} ({level} n/a)"
    return f"{value:.{digits}f} ({level} {low:.{digits}f}\u2013{high:.{digits}f})"
