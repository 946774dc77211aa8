"""Metrics with stratified-bootstrap CIs, and the predictions.csv / metrics.json files."""

from __future__ import annotations

import csv
import json
import math
import time

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

from her2jax.errors import Her2jaxError
from her2jax.evaluate import files, metrics
from her2jax.labels import CLASS_NAMES

THREE = CLASS_NAMES["her2_3class"]
BINARY = CLASS_NAMES["her2_binary"]


def softmax_cases(n: int, k: int = 3, signal: float = 1.0, seed: int = 0):
    """[n] labels and [n, k] probabilities whose true-class logit is raised by ``signal``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += signal
    probs = np.exp(logits)
    return labels, probs / probs.sum(axis=1, keepdims=True)


def mann_whitney_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """An independent AUC (mid-ranks), for the scipy.stats.bootstrap comparison."""
    ranks = scipy.stats.rankdata(np.concatenate([pos, neg]))
    return (ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


# --- point estimates ---------------------------------------------------------------------------

@pytest.mark.parametrize("k,seed", [(3, 0), (3, 1), (4, 2)])
def test_point_estimates_equal_sklearn(k, seed):
    labels, probs = softmax_cases(300, k=k, seed=seed)
    probs = np.round(probs, 2)  # ties: mid-rank handling must match sklearn's
    probs /= probs.sum(axis=1, keepdims=True)
    names = [f"c{c}" for c in range(k)]
    s = metrics.summarize(labels, probs, names, n_boot=0)
    one_hot = label_binarize(labels, classes=list(range(k)))
    assert s["micro_auc"]["value"] == pytest.approx(roc_auc_score(one_hot.ravel(), probs.ravel()),
                                                    abs=1e-12)
    assert s["micro_auc"]["value"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="micro"), abs=1e-12)
    assert s["macro_auc"]["value"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12)
    for c, name in enumerate(names):
        assert s["per_class_auc"][name]["value"] == pytest.approx(
            roc_auc_score(labels == c, probs[:, c]), abs=1e-12)
    for i in range(k):
        for j in range(i + 1, k):
            keep = (labels == i) | (labels == j)
            p_i, p_j = probs[keep, i], probs[keep, j]
            entry = s["pairwise_auc"][f"c{i} vs c{j}"]
            # p_j / (p_i + p_j), in the difference form whose swap is an exact negation.
            assert entry["value"] == pytest.approx(
                roc_auc_score(labels[keep] == j, (p_j - p_i) / (p_i + p_j)), abs=1e-12)
            # Normalised scores make Hand & Till's two directions one number.
            assert entry["value"] == pytest.approx(
                roc_auc_score(labels[keep] == i, (p_i - p_j) / (p_i + p_j)), abs=1e-12)
            # The ratio form ranks the same up to float rounding of exact ties.
            assert entry["value"] == pytest.approx(
                roc_auc_score(labels[keep] == j, p_j / (p_i + p_j)), abs=2e-3)
    assert len(s["pairwise_auc"]) == k * (k - 1) // 2
    predicted = probs.argmax(axis=1)
    assert s["confusion_matrix"] == confusion_matrix(labels, predicted, labels=range(k)).tolist()
    assert s["accuracy"] == pytest.approx(np.mean(predicted == labels))
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert np.isnan(s["macro_auc"]["ci_low"])  # n_boot=0: no interval


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans(), st.integers(0, 3)),
                min_size=2, max_size=30))
def test_weighted_auc_equals_auc_of_repeated_cases(items):
    """Bootstrap counts as weights == the AUC of the data with each case repeated that often."""
    scores = np.array([s for s, _, _ in items], dtype=float)  # few values: many ties
    positive = np.array([p for _, p, _ in items])
    counts = np.array([c for _, _, c in items], dtype=float)
    auc = metrics._Auc(scores, positive, np.arange(len(items))).evaluate(counts[None])[0]
    repeated = np.repeat(np.arange(len(items)), counts.astype(int))
    if len(set(positive[repeated].tolist())) < 2:
        assert np.isnan(auc)
    else:
        assert auc == pytest.approx(roc_auc_score(positive[repeated], scores[repeated]), abs=1e-12)


def test_perfect_classifier_is_one_with_a_degenerate_interval():
    labels = np.repeat([0, 1, 2], 20)
    probs = np.full((60, 3), 0.1)
    probs[np.arange(60), labels] = 0.8
    s = metrics.summarize(labels, probs, THREE, n_boot=200)
    entries = [s["micro_auc"], s["macro_auc"], *s["per_class_auc"].values(),
               *s["pairwise_auc"].values()]
    for entry in entries:
        assert entry == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    assert s["accuracy"] == 1.0 and s["balanced_accuracy"] == 1.0
    assert s["confusion_matrix"] == [[20, 0, 0], [0, 20, 0], [0, 0, 20]]


def test_uninformative_classifier_is_about_one_half():
    labels, probs = softmax_cases(3000, signal=0.0, seed=3)
    s = metrics.summarize(labels, probs, THREE, n_boot=300)
    for entry in [s["micro_auc"], s["macro_auc"], *s["per_class_auc"].values(),
                  *s["pairwise_auc"].values()]:
        assert abs(entry["value"] - 0.5) < 0.04
        assert entry["ci_low"] < 0.5 + 0.01 and entry["ci_high"] > 0.5 - 0.01


# --- the bootstrap -----------------------------------------------------------------------------

def test_bootstrap_agrees_with_scipy_stratified():
    """Our stratified percentile CIs vs scipy.stats.bootstrap given one sample per true class.

    scipy resamples each of several samples independently (``paired=False``): passing the case
    indices of each true class as separate samples is exactly resampling within classes. The
    statistic is recomputed from scratch with mid-rank Mann-Whitney AUCs. Both use 2,000
    percentile resamples, different random streams: at N=400 the Monte Carlo error of an
    interval end is ~0.002, so the ends must agree within 0.01.
    """
    labels, probs = softmax_cases(400, seed=4)
    n_boot = 2000

    def statistic(*by_class):
        idx = np.concatenate(by_class)
        y, p = labels[idx], probs[idx]
        per_class = [mann_whitney_auc(p[y == c, c], p[y != c, c]) for c in range(3)]
        one_hot = y[:, None] == np.arange(3)
        micro = mann_whitney_auc(p[one_hot], p[~one_hot])
        keep = (y == 1) | (y == 2)  # low vs positive
        ratio = p[keep, 2] / (p[keep, 1] + p[keep, 2])
        pair = mann_whitney_auc(ratio[y[keep] == 2], ratio[y[keep] == 1])
        return np.array([micro, np.mean(per_class), per_class[0], pair])

    data = tuple(np.flatnonzero(labels == c) for c in range(3))
    reference = scipy.stats.bootstrap(data, statistic, n_resamples=n_boot, method="percentile",
                                      vectorized=False, paired=False,
                                      rng=np.random.default_rng(123))
    s = metrics.summarize(labels, probs, THREE, n_boot=n_boot, seed=0)
    ours = [s["micro_auc"], s["macro_auc"], s["per_class_auc"]["HER2-zero"],
            s["pairwise_auc"]["HER2-low vs HER2-positive"]]
    point = statistic(*data)
    for m, entry in enumerate(ours):
        assert entry["value"] == pytest.approx(point[m], abs=1e-12)
        assert entry["ci_low"] == pytest.approx(reference.confidence_interval.low[m], abs=0.01)
        assert entry["ci_high"] == pytest.approx(reference.confidence_interval.high[m], abs=0.01)

    # scipy (1.17) draws each sample's indices as rng.integers(0, n_k, (n_resamples, n_k)), in
    # sample order -- our draws too -- so with the same seed the resamples are the same ones and
    # the intervals agree to rounding. Should a scipy release change its draws, only this
    # stricter check (not the one above) would need to go.
    same_seed = scipy.stats.bootstrap(data, statistic, n_resamples=n_boot, method="percentile",
                                      vectorized=False, paired=False,
                                      rng=np.random.default_rng(0))
    for m, entry in enumerate(ours):
        assert entry["ci_low"] == pytest.approx(same_seed.confidence_interval.low[m], abs=1e-9)
        assert entry["ci_high"] == pytest.approx(same_seed.confidence_interval.high[m], abs=1e-9)


def test_interval_contains_value_and_narrows_with_n():
    widths = []
    for n in (100, 400, 1600):
        labels, probs = softmax_cases(n, seed=5)
        s = metrics.summarize(labels, probs, THREE, n_boot=500)
        for entry in [s["micro_auc"], s["macro_auc"], *s["per_class_auc"].values()]:
            assert entry["ci_low"] < entry["value"] < entry["ci_high"]
        widths.append(s["macro_auc"]["ci_high"] - s["macro_auc"]["ci_low"])
        assert all(count == 0 for count in s["bootstrap"]["skipped"].values())
    assert widths[0] > 1.5 * widths[1] > 1.5 * 1.5 * widths[2]  # ~1/sqrt(N): halves per 4x


def test_seeded_bootstrap_is_reproducible():
    labels, probs = softmax_cases(200, seed=6)
    a = metrics.summarize(labels, probs, THREE, n_boot=500, seed=7)
    b = metrics.summarize(labels, probs, THREE, n_boot=500, seed=7)
    c = metrics.summarize(labels, probs, THREE, n_boot=500, seed=8)
    assert a == b
    assert c["macro_auc"]["value"] == a["macro_auc"]["value"]
    assert c["macro_auc"]["ci_low"] != a["macro_auc"]["ci_low"]
    assert abs(c["macro_auc"]["ci_low"] - a["macro_auc"]["ci_low"]) < 0.02
    assert a["bootstrap"] == {"method": "stratified percentile", "n_boot": 500, "seed": 7,
                              "confidence": 0.95, "skipped": a["bootstrap"]["skipped"],
                              "note": None}


def test_confidence_level_widens_the_interval():
    labels, probs = softmax_cases(200, seed=9)
    narrow = metrics.summarize(labels, probs, THREE, n_boot=500, confidence=0.8)["macro_auc"]
    wide = metrics.summarize(labels, probs, THREE, n_boot=500, confidence=0.99)["macro_auc"]
    assert wide["ci_low"] < narrow["ci_low"] < narrow["ci_high"] < wide["ci_high"]


def test_bootstrap_is_fast():
    labels, probs = softmax_cases(500, seed=10)
    start = time.perf_counter()
    metrics.summarize(labels, probs, THREE, n_boot=2000)
    assert time.perf_counter() - start < 2.0  # ~0.1 s on 2 cores


def test_more_than_half_skipped_gives_nan_interval(monkeypatch):
    """The skip rule (never triggered by stratified resampling itself) leaves the CI NaN."""
    original = metrics._Auc.evaluate

    def mostly_undefined(self, case_weights):
        out = original(self, case_weights)
        if len(out) > 1:  # bootstrap chunks, not the point estimate
            out[: int(0.6 * len(out))] = np.nan
        return out

    monkeypatch.setattr(metrics._Auc, "evaluate", mostly_undefined)
    labels, probs = softmax_cases(100, seed=11)
    s = metrics.summarize(labels, probs, THREE, n_boot=100)
    assert s["bootstrap"]["skipped"]["per_class_auc/HER2-zero"] == 60
    assert math.isfinite(s["per_class_auc"]["HER2-zero"]["value"])
    assert math.isnan(s["per_class_auc"]["HER2-zero"]["ci_low"])
    assert math.isnan(s["macro_auc"]["ci_high"])


# --- pairwise, binary, missing classes ---------------------------------------------------------

def test_pairwise_separated_and_random_pairs():
    """zero vs low perfectly separated, low vs positive at chance."""
    rng = np.random.default_rng(12)
    labels = np.repeat([0, 1, 2], 300)
    probs = np.empty((900, 3))
    probs[labels == 0] = (0.9, 0.05, 0.05)
    u = rng.uniform(0.2, 0.8, size=600)  # same law for low and positive: chance between them
    probs[labels > 0] = np.stack([np.full(600, 0.05), 0.95 * u, 0.95 * (1 - u)], axis=1)
    s = metrics.summarize(labels, probs, THREE, n_boot=300)
    assert list(s["pairwise_auc"]) == ["HER2-zero vs HER2-low", "HER2-low vs HER2-positive",
                                       "HER2-zero vs HER2-positive"]
    assert s["pairwise_auc"]["HER2-zero vs HER2-low"]["value"] == 1.0
    assert s["pairwise_auc"]["HER2-zero vs HER2-positive"]["value"] == 1.0
    chance = s["pairwise_auc"]["HER2-low vs HER2-positive"]
    assert abs(chance["value"] - 0.5) < 0.06
    assert chance["ci_low"] < 0.5 < chance["ci_high"]


def test_confusion_matrix_counts_rows_true_columns_predicted():
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([[0.7, 0.2, 0.1],    # 0 -> 0
                      [0.2, 0.7, 0.1],    # 0 -> 1
                      [0.1, 0.2, 0.7],    # 0 -> 2
                      [0.1, 0.8, 0.1],    # 1 -> 1
                      [0.1, 0.8, 0.1],    # 1 -> 1
                      [0.6, 0.1, 0.3]])   # 2 -> 0
    s = metrics.summarize(labels, probs, THREE, n_boot=0)
    assert s["confusion_matrix"] == [[1, 1, 1], [0, 2, 0], [1, 0, 0]]
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["balanced_accuracy"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert s["n"] == 6 and s["class_counts"] == {"HER2-zero": 3, "HER2-low": 2,
                                                 "HER2-positive": 1}


def test_binary_micro_and_macro_are_the_positive_class_auc():
    labels, probs = softmax_cases(300, k=2, seed=13)
    s = metrics.summarize(labels, probs, BINARY, n_boot=300)
    auc = roc_auc_score(labels, probs[:, 1])
    assert s["micro_auc"]["value"] == pytest.approx(auc, abs=1e-12)
    assert s["macro_auc"]["value"] == pytest.approx(auc, abs=1e-12)
    assert s["micro_auc"] == s["macro_auc"]
    assert list(s["pairwise_auc"]) == ["HER2-negative vs HER2-positive"]
    assert s["pairwise_auc"]["HER2-negative vs HER2-positive"]["value"] == pytest.approx(auc)
    for entry in s["per_class_auc"].values():
        assert entry["value"] == pytest.approx(auc, abs=1e-12)
    assert np.array(s["confusion_matrix"]).shape == (2, 2)


def test_absent_class_is_none_not_a_crash(tmp_path):
    labels, probs = softmax_cases(200, seed=14)
    keep = labels != 1  # no HER2-low case
    labels, probs = labels[keep], probs[keep]
    s = metrics.summarize(labels, probs, THREE, n_boot=200)
    none = {"value": None, "ci_low": None, "ci_high": None}
    assert s["per_class_auc"]["HER2-low"] == none
    assert s["pairwise_auc"]["HER2-zero vs HER2-low"] == none
    assert s["pairwise_auc"]["HER2-low vs HER2-positive"] == none
    assert s["pairwise_auc"]["HER2-zero vs HER2-positive"]["value"] is not None
    present = [s["per_class_auc"][name]["value"] for name in ("HER2-zero", "HER2-positive")]
    assert s["macro_auc"]["value"] == pytest.approx(np.mean(present))
    one_hot = label_binarize(labels, classes=[0, 1, 2])
    assert s["micro_auc"]["value"] == pytest.approx(roc_auc_score(one_hot.ravel(), probs.ravel()))
    assert s["class_counts"]["HER2-low"] == 0

    only_zero = metrics.summarize(np.zeros(5, dtype=int), probs[:5], THREE, n_boot=50)
    assert only_zero["micro_auc"] == none and only_zero["macro_auc"] == none
    assert all(entry == none for entry in only_zero["per_class_auc"].values())
    assert only_zero["accuracy"] is not None
    files.write_metrics(tmp_path / "metrics.json", only_zero)
    assert files.read_metrics(tmp_path / "metrics.json")["macro_auc"] == none

    empty = metrics.summarize(np.zeros(0, dtype=int), np.zeros((0, 3)), THREE)
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["macro_auc"] == none


@pytest.mark.parametrize("labels,probs,key", [
    ([0, 1, 3], np.full((3, 3), 1 / 3), "labels"),
    ([0, 1, -1], np.full((3, 3), 1 / 3), "labels"),
    ([0, 1, 2], np.full((3, 3), 1.0), "probs"),       # logits, not probabilities
    ([0, 1, 2], np.full((3, 2), 0.5), "probs"),       # wrong number of columns
    ([0, 1], np.full((3, 3), 1 / 3), "labels"),
])
def test_bad_inputs_raise_her2jax_error(labels, probs, key):
    with pytest.raises(Her2jaxError) as error:
        metrics.summarize(np.array(labels), probs, THREE)
    assert error.value.key == key


def test_format_auc():
    entry = {"value": 0.8334, "ci_low": 0.8176, "ci_high": 0.84749}
    assert metrics.format_auc(entry) == "0.833 (95% CI 0.818\u20130.847)"
    assert metrics.format_auc({"value": None, "ci_low": None, "ci_high": None}) == "n/a"
    assert metrics.format_auc({"value": 0.5, "ci_low": math.nan, "ci_high": None}) == \
        "0.500 (95% CI n/a)"
    assert metrics.format_auc(entry, digits=2, confidence=0.9) == "0.83 (90% CI 0.82\u20130.85)"


# --- files -------------------------------------------------------------------------------------

def test_predictions_round_trip(tmp_path):
    rng = np.random.default_rng(15)
    probs = rng.dirichlet([1, 1, 1], size=5).astype(np.float32)  # what a model emits
    probs[0] = (1 / 3, 1 / 3, 1 / 3)
    path = tmp_path / "eval" / "test" / "predictions.csv"
    files.write_predictions(
        path, patient_ids=["007", "P2", "P,3", "P4", "P5"], centers=["A", "A", "B", "B", "C"],
        labels=np.array([0, 1, 2, -1, 1]), probs=probs, class_names=THREE,
        clinical={"age": [51, 62, None, 48, float("nan")], "subtype": ["luminal A"] * 5})
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header == ["patient_id", "center", "label", "prob_HER2-zero", "prob_HER2-low",
                      "prob_HER2-positive", "age", "subtype"]
    assert not [p.name for p in path.parent.iterdir() if p.name != "predictions.csv"]

    frame = files.read_predictions(path)
    assert list(frame.columns) == header
    assert frame["patient_id"].tolist() == ["007", "P2", "P,3", "P4", "P5"]
    assert frame["label"].tolist() == ["HER2-zero", "HER2-low", "HER2-positive", "", "HER2-low"]
    assert frame["age"].tolist() == ["51", "62", "", "48", ""]
    got = frame[["prob_HER2-zero", "prob_HER2-low", "prob_HER2-positive"]].to_numpy()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, probs.astype(np.float64), rtol=0, atol=1e-9)
    assert np.array_equal(got, probs.astype(np.float64))  # repr: exact

    labels, arrays, names = files.prediction_arrays(frame)
    assert labels.tolist() == [0, 1, 2, -1, 1] and names == list(THREE)
    assert np.array_equal(arrays, got)


def test_predictions_without_clinical_and_binary(tmp_path):
    path = tmp_path / "predictions.csv"
    files.write_predictions(path, patient_ids=["a", "b"], centers=["X", "Y"], labels=[1, 0],
                            probs=np.array([[0.25, 0.75], [0.9, 0.1]]), class_names=BINARY)
    frame = files.read_predictions(path)
    assert list(frame.columns) == ["patient_id", "center", "label", "prob_HER2-negative",
                                   "prob_HER2-positive"]
    assert files.class_names_of(frame) == list(BINARY)


def test_write_predictions_rejects_mismatched_input(tmp_path):
    ok = dict(patient_ids=["a", "b"], centers=["X", "Y"], labels=[0, 1],
              probs=np.full((2, 3), 1 / 3), class_names=THREE)
    with pytest.raises(Her2jaxError, match="probs"):
        files.write_predictions(tmp_path / "p.csv", **{**ok, "probs": np.full((3, 3), 1 / 3)})
    with pytest.raises(Her2jaxError, match="labels"):
        files.write_predictions(tmp_path / "p.csv", **{**ok, "labels": [0, 3]})
    with pytest.raises(Her2jaxError, match="duplicate"):
        files.write_predictions(tmp_path / "p.csv", **ok, clinical={"center": ["1", "2"]})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("drop", ["patient_id", "center", "label"])
def test_read_predictions_names_file_and_missing_column(tmp_path, drop):
    path = tmp_path / "predictions.csv"
    columns = [c for c in ("patient_id", "center", "label") if c != drop]
    path.write_text(",".join([*columns, "prob_HER2-zero"]) + "\n" + ",".join(["x"] * 3 + ["1"])
                    + "\n")
    with pytest.raises(Her2jaxError) as error:
        files.read_predictions(path)
    assert error.value.file == str(path) and error.value.key == drop
    assert drop in str(error.value) and str(path) in str(error.value)


def test_read_predictions_rejects_bad_content(tmp_path):
    path = tmp_path / "predictions.csv"
    path.write_text("patient_id,center,label\nP1,A,HER2-zero\n")
    with pytest.raises(Her2jaxError, match="prob_"):
        files.read_predictions(path)
    path.write_text("patient_id,center,label,prob_a,prob_b\nP1,A,a,0.5,oops\n")
    with pytest.raises(Her2jaxError) as error:
        files.read_predictions(path)
    assert error.value.key == "prob_b"
    path.write_text("patient_id,center,label,prob_a,prob_b\nP1,A,c,0.5,0.5\n")
    with pytest.raises(Her2jaxError, match="not classes"):
        files.read_predictions(path)
    with pytest.raises(Her2jaxError, match="not found"):
        files.read_predictions(tmp_path / "missing.csv")


def test_metrics_json_round_trip(tmp_path):
    labels, probs = softmax_cases(120, seed=16)
    summary = metrics.summarize(labels, probs, THREE, n_boot=100)
    summary["macro_auc"]["ci_low"] = math.nan  # as a skipped-out interval would be
    summary["extra"] = {"counts": np.arange(3), "flag": np.bool_(True), "inf": np.float32("inf")}
    path = tmp_path / "eval" / "metrics.json"
    files.write_metrics(path, summary)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert text.startswith('{\n  "n": 120,')  # indent 2
    back = files.read_metrics(path)
    assert back["macro_auc"]["ci_low"] is None
    assert back["extra"] == {"counts": [0, 1, 2], "flag": True, "inf": None}
    assert back["micro_auc"] == summary["micro_auc"]
    assert back["per_class_auc"] == summary["per_class_auc"]
    assert back["confusion_matrix"] == summary["confusion_matrix"]
    for key in ("n", "class_names", "micro_auc", "macro_auc", "per_class_auc", "pairwise_auc",
                "confusion_matrix", "accuracy", "balanced_accuracy"):
        assert key in back
    assert json.loads(text) == back
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(Her2jaxError, match="JSON object"):
        files.read_metrics(tmp_path / "bad.json")


# --- new metrics: F1, kappa, Brier, ECE, DeLong, binary operating points, BCa -------------------

Z95 = 1.959963984540054  # Phi^-1(0.975)


def binary_six():
    """3 negatives scored 0.15, 0.45, 0.65 and 3 positives 0.35, 0.75, 0.95 (p(positive))."""
    p = np.array([0.15, 0.45, 0.65, 0.35, 0.75, 0.95])
    return np.array([0, 0, 0, 1, 1, 1]), np.stack([1 - p, p], axis=1)


def binormal(n: int, shift: float, seed: int):
    """Binary cases, half negative N(0, 1) and half positive N(shift, 1), as probabilities.

    The true AUC is Phi(shift / sqrt(2)) (the sigmoid is monotone, so ranks are the x's).
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], [n // 2, n - n // 2])
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + shift * labels)))
    return labels, np.stack([1 - p, p], axis=1)


def test_new_metrics_hand_computed_binary():
    labels, probs = binary_six()
    s = metrics.summarize(labels, probs, BINARY, n_boot=0)
    # argmax calls 0.65 positive and 0.35 negative: confusion [[2, 1], [1, 2]].
    assert s["confusion_matrix"] == [[2, 1], [1, 2]]
    assert s["macro_f1"] == pytest.approx(2 / 3)           # both classes P = R = 2/3
    # kappa: observed disagreement 2/6, expected (3*3 + 3*3) / 36 = 1/2 -> 1 - (2/6) / (1/2).
    assert s["quadratic_weighted_kappa"] == pytest.approx(1 / 3)
    # Brier: 2 (p1 - y)^2 per case: 2 (.0225 + .2025 + .4225 + .4225 + .0625 + .0025) / 6.
    assert s["brier"] == pytest.approx(2.27 / 6)
    # ECE: top confidences .85 .55 .65 .65 .75 .95, correct T T F F T T, one bin each except .65:
    # (|1 - .55| + 2 |0 - .65| + |1 - .75| + |1 - .85| + |1 - .95|) / 6.
    assert s["ece"] == pytest.approx(2.2 / 6)
    assert s["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))
    assert s["quadratic_weighted_kappa"] == pytest.approx(
        cohen_kappa_score(labels, probs.argmax(1), weights="quadratic"))

    # DeLong: V10 = (1/3, 1, 1), V01 = (1, 2/3, 2/3); AUC 7/9; S10 = 4/27, S01 = 1/27;
    # Var = S10 / 3 + S01 / 3 = 5/81, SE = sqrt(5) / 9.
    delong = s["per_class_auc_delong"]["HER2-positive"]
    assert delong["value"] == pytest.approx(7 / 9)
    assert delong["ci_low"] == pytest.approx(7 / 9 - Z95 * math.sqrt(5) / 9)
    assert delong["ci_high"] == 1.0  # 7/9 + 0.487 clipped
    assert s["per_class_auc_delong"]["HER2-negative"] == pytest.approx(delong)
    assert s["binary"]["auc_delong"] == delong
    assert s["binary"]["auc"]["value"] == pytest.approx(7 / 9)

    # Thresholds (call positive when p >= t): .95 -> (1/3, 1), .75 -> (2/3, 1), .65 -> (2/3, 2/3),
    # .45 -> (2/3, 1/3), .35 -> (1, 1/3), .15 -> (1, 0). Youden J peaks at .75 (J = 2/3);
    # the most specific threshold with sensitivity >= 0.9 is .35.
    assert s["binary"]["youden"] == pytest.approx(
        {"threshold": 0.75, "sensitivity": 2 / 3, "specificity": 1.0})
    assert s["binary"]["at_sensitivity"] == pytest.approx(
        {"target": 0.9, "threshold": 0.35, "sensitivity": 1.0, "specificity": 1 / 3})


def test_new_metrics_hand_computed_three_class():
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7],
                      [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.6, 0.1, 0.3]])
    s = metrics.summarize(labels, probs, THREE, n_boot=0)
    # Confusion [[1, 1, 1], [0, 2, 0], [1, 0, 0]]: F1 = 2TP / (row + column) = 2/5, 4/5, 0.
    assert s["macro_f1"] == pytest.approx(0.4)
    # Quadratic weights (i - j)^2: observed sum 1 + 4 + 4 = 9; expected outer((3, 2, 1),
    # (2, 3, 1)) / 6 weighted: 3.5 + 1 + 11/6 = 19/3 -> kappa = 1 - 27/19 = -8/19.
    assert s["quadratic_weighted_kappa"] == pytest.approx(-8 / 19)
    # Brier: .14 + 1.14 + 1.34 + .06 + .06 + .86 = 3.6, over 6 cases.
    assert s["brier"] == pytest.approx(0.6)
    predicted = probs.argmax(1)
    assert s["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert s["quadratic_weighted_kappa"] == pytest.approx(
        cohen_kappa_score(labels, predicted, weights="quadratic"))
    assert s["binary"] is None
    assert set(s["per_class_auc_delong"]) == set(THREE)


def test_new_metrics_undefined_are_none(tmp_path):
    empty = metrics.summarize(np.zeros(0, dtype=int), np.zeros((0, 2)), BINARY, n_boot=10)
    for key in ("macro_f1", "quadratic_weighted_kappa", "brier", "ece"):
        assert empty[key] is None
    assert empty["binary"]["youden"]["threshold"] is None
    assert empty["binary"]["auc"]["value"] is None
    one_class = metrics.summarize(np.zeros(4, dtype=int), np.full((4, 2), 0.5), BINARY, n_boot=10)
    assert one_class["quadratic_weighted_kappa"] is None  # all true and predicted in class 0
    assert one_class["per_class_auc_delong"]["HER2-positive"]["value"] is None
    files.write_metrics(tmp_path / "m.json", one_class)
    back = files.read_metrics(tmp_path / "m.json")
    assert back["binary"]["at_sensitivity"]["target"] == 0.9 and back["brier"] == 0.25 * 2


@pytest.mark.parametrize("k,seed", [(2, 20), (3, 21), (4, 22)])
def test_delong_point_estimate_equals_sklearn(k, seed):
    labels, probs = softmax_cases(300, k=k, seed=seed)
    probs = np.round(probs, 2)  # ties: the midranks must count them one half
    probs /= probs.sum(axis=1, keepdims=True)
    s = metrics.summarize(labels, probs, [f"c{c}" for c in range(k)], n_boot=0)
    for c in range(k):
        entry = s["per_class_auc_delong"][f"c{c}"]
        assert entry["value"] == pytest.approx(roc_auc_score(labels == c, probs[:, c]), abs=1e-12)
        assert entry["ci_low"] < entry["value"] < entry["ci_high"]


def test_midrank_equals_scipy_rankdata():
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 7.0])
    np.testing.assert_array_equal(metrics._midrank(x), scipy.stats.rankdata(x))


def test_delong_agrees_with_bootstrap_on_a_large_sample():
    """At N=2000 DeLong's normal interval and the 2,000-resample percentile interval agree.

    Both estimate the same sampling variance (the bootstrap's Monte Carlo error of an end is
    ~0.002 here, and the AUC's sampling distribution is near normal): ends within 0.01.
    """
    labels, probs = softmax_cases(2000, signal=1.0, seed=23)
    s = metrics.summarize(labels, probs, THREE, n_boot=2000)
    for name in THREE:
        boot, delong = s["per_class_auc"][name], s["per_class_auc_delong"][name]
        assert delong["value"] == pytest.approx(boot["value"], abs=1e-12)
        assert delong["ci_low"] == pytest.approx(boot["ci_low"], abs=0.01)
        assert delong["ci_high"] == pytest.approx(boot["ci_high"], abs=0.01)
    labels, probs = binormal(2000, 1.0, seed=24)
    s = metrics.summarize(labels, probs, BINARY, n_boot=2000)
    assert s["binary"]["auc_delong"]["ci_low"] == pytest.approx(s["binary"]["auc"]["ci_low"],
                                                                abs=0.01)
    assert s["binary"]["auc_delong"]["ci_high"] == pytest.approx(s["binary"]["auc"]["ci_high"],
                                                                 abs=0.01)


def test_percentile_and_delong_intervals_cover_the_true_auc():
    """100 binormal data sets (N=200, true AUC Phi(1/sqrt 2) = 0.760): 95% CIs cover 85-100%.

    With 100 trials the binomial SD of a 95% coverage is ~2%, so 85% is a >4 SD miss.
    """
    true_auc = scipy.stats.norm.cdf(1.0 / math.sqrt(2.0))
    covered = {"bootstrap": 0, "delong": 0}
    for trial in range(100):
        labels, probs = binormal(200, 1.0, seed=1000 + trial)
        s = metrics.summarize(labels, probs, BINARY, n_boot=200, seed=trial)
        for key, entry in (("bootstrap", s["binary"]["auc"]), ("delong", s["binary"]["auc_delong"])):
            covered[key] += entry["ci_low"] <= true_auc <= entry["ci_high"]
    assert 85 <= covered["bootstrap"] <= 100
    assert 85 <= covered["delong"] <= 100


def test_bca_agrees_with_scipy():
    """BCa vs scipy.stats.bootstrap(method='BCa') with one sample per true class (stratified).

    scipy's multi-sample acceleration is the per-sample jackknife we use. With the same seed the
    resamples are the same (see test_bootstrap_agrees_with_scipy_stratified), so the intervals
    agree to rounding (1e-9); with another seed, within 0.015 (Monte Carlo error ~0.003 at 1,000
    resamples and N=400, larger for BCa's adjusted tail levels).
    """
    labels, probs = softmax_cases(400, seed=25)
    n_boot = 1000

    def statistic(*by_class):
        idx = np.concatenate(by_class)
        y, p = labels[idx], probs[idx]
        return np.array([mann_whitney_auc(p[y == c, c], p[y != c, c]) for c in (0, 2)])

    data = tuple(np.flatnonzero(labels == c) for c in range(3))
    s = metrics.summarize(labels, probs, THREE, n_boot=n_boot, seed=0, ci_method="bca")
    assert s["bootstrap"]["method"] == "stratified bca" and s["bootstrap"]["note"] is None
    ours = [s["per_class_auc"]["HER2-zero"], s["per_class_auc"]["HER2-positive"]]
    for seed, tolerance in ((0, 1e-9), (123, 0.015)):
        reference = scipy.stats.bootstrap(data, statistic, n_resamples=n_boot, method="BCa",
                                          vectorized=False, paired=False,
                                          rng=np.random.default_rng(seed))
        for m, entry in enumerate(ours):
            assert entry["ci_low"] == pytest.approx(reference.confidence_interval.low[m],
                                                    abs=tolerance)
            assert entry["ci_high"] == pytest.approx(reference.confidence_interval.high[m],
                                                     abs=tolerance)


def test_bca_is_percentile_when_symmetric_and_moves_away_from_the_ceiling_when_skewed():
    # Chance AUC on 1,000 cases: the bootstrap distribution is symmetric about the estimate,
    # so z0 ~ 0 and a ~ 0 and BCa is the percentile interval (within Monte Carlo noise).
    labels, probs = binormal(1000, 0.0, seed=26)
    pct = metrics.summarize(labels, probs, BINARY, n_boot=1000)["macro_auc"]
    bca = metrics.summarize(labels, probs, BINARY, n_boot=1000, ci_method="bca")["macro_auc"]
    assert bca["ci_low"] == pytest.approx(pct["ci_low"], abs=0.005)
    assert bca["ci_high"] == pytest.approx(pct["ci_high"], abs=0.005)
    # AUC 0.975 on 40 cases: the bootstrap distribution piles up against 1 and is skewed left;
    # BCa reaches further down than the percentile interval (which is too short on that side).
    labels, probs = binormal(40, 3.0, seed=1)
    pct = metrics.summarize(labels, probs, BINARY, n_boot=2000)["macro_auc"]
    bca = metrics.summarize(labels, probs, BINARY, n_boot=2000, ci_method="bca")["macro_auc"]
    assert pct["value"] == bca["value"] == pytest.approx(0.975)
    assert bca["ci_low"] < pct["ci_low"] - 0.02
    assert bca["ci_low"] < bca["value"] <= bca["ci_high"] <= 1.0


def test_bca_falls_back_to_percentile_above_the_cap(monkeypatch):
    labels, probs = softmax_cases(120, seed=27)
    pct = metrics.summarize(labels, probs, THREE, n_boot=200)
    monkeypatch.setattr(metrics, "BCA_MAX_N", 100)
    s = metrics.summarize(labels, probs, THREE, n_boot=200, ci_method="bca")
    assert s["bootstrap"]["method"] == "stratified percentile"
    assert "N = 120 > 100" in s["bootstrap"]["note"]
    assert s["macro_auc"] == pct["macro_auc"]
    with pytest.raises(Her2jaxError) as error:
        metrics.summarize(labels, probs, THREE, ci_method="basic")
    assert error.value.key == "ci_method"


def test_bootstrap_progress_bar_shows_on_request_and_changes_nothing(capsys):
    labels, probs = softmax_cases(200, seed=9)
    quiet = metrics.summarize(labels, probs, THREE, n_boot=300, seed=1)
    assert capsys.readouterr().err == ""
    shown = metrics.summarize(labels, probs, THREE, n_boot=300, seed=1, progress="val")
    err = capsys.readouterr().err
    assert "bootstrap val" in err and "AUC" in err
    assert shown == quiet
