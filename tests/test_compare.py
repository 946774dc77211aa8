"""Paired bootstrap comparison of two models (evaluate.compare, her2jax-compare)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from her2jax.errors import Her2jaxError
from her2jax.evaluate import compare, files
from her2jax.labels import CLASS_NAMES

THREE = list(CLASS_NAMES["her2_3class"])
BINARY = list(CLASS_NAMES["her2_binary"])


def _probs(labels, k, signal, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), k))
    logits[np.arange(len(labels)), np.maximum(labels, 0)] += signal
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def _write(path, labels, probs, class_names=THREE, ids=None):
    ids = [f"P{i:04d}" for i in range(len(labels))] if ids is None else ids
    files.write_predictions(path, patient_ids=ids, centers=["A"] * len(labels), labels=labels,
                            probs=probs, class_names=class_names)
    return path


def _labels(n, k=3, seed=0):
    labels = np.random.default_rng(seed).integers(0, k, n)
    labels[:k] = np.arange(k)
    return labels


def test_identical_models_differ_by_zero(tmp_path):
    labels = _labels(120)
    labels[-4:] = -1  # unlabelled patients are left out
    path = _write(tmp_path / "a.csv", labels, _probs(labels, 3, 1.0, 1))
    result = compare.compare_files(path, path, n_boot=300)
    assert result["n"] == 116
    assert result["difference"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert result["p_value"] == 1.0
    assert result["macro_auc_a"] == result["macro_auc_b"]
    keep = labels >= 0
    expected = roc_auc_score(labels[keep], _probs(labels, 3, 1.0, 1)[keep], multi_class="ovr",
                             average="macro")
    assert result["macro_auc_a"]["value"] == pytest.approx(expected, abs=1e-12)


def test_clearly_better_model(tmp_path):
    labels = _labels(500)
    probs_a, probs_b = _probs(labels, 3, 0.3, 1), _probs(labels, 3, 2.5, 2)
    # B's rows in another order: alignment is by patient id.
    ids = [f"P{i:04d}" for i in range(500)]
    order = np.random.default_rng(3).permutation(500)
    a = _write(tmp_path / "a.csv", labels, probs_a)
    b = _write(tmp_path / "b.csv", labels[order], probs_b[order], ids=[ids[i] for i in order])
    start = time.perf_counter()
    result = compare.compare_files(a, b, n_boot=2000, seed=0)
    assert time.perf_counter() - start < 5.0
    auc = {name: roc_auc_score(labels, p, multi_class="ovr", average="macro")
           for name, p in (("a", probs_a), ("b", probs_b))}
    assert result["macro_auc_a"]["value"] == pytest.approx(auc["a"], abs=1e-12)
    assert result["macro_auc_b"]["value"] == pytest.approx(auc["b"], abs=1e-12)
    d = result["difference"]
    assert d["value"] == pytest.approx(auc["b"] - auc["a"], abs=1e-12)
    assert 0 < d["ci_low"] < d["value"] < d["ci_high"]
    assert result["p_value"] == pytest.approx(2 / 2001)
    # Same seed, same answer; the bootstrap of A agrees with an sklearn loop on a few draws.
    assert compare.compare_files(a, b, n_boot=2000, seed=0) == result


def test_weighted_auc_matches_sklearn_on_resamples():
    labels = _labels(80)
    probs = np.round(_probs(labels, 3, 1.0, 4), 1)  # many ties
    rng = np.random.default_rng(0)
    draws = rng.integers(0, 80, size=(5, 80))
    counts = np.stack([np.bincount(row, minlength=80) for row in draws]).astype(float)
    got = compare._macro_auc(labels, probs, counts)
    for row, value in zip(draws, got, strict=True):
        if len(set(labels[row])) == 3:
            expected = np.mean([roc_auc_score(labels[row] == c, probs[row, c]) for c in range(3)])
            assert value == pytest.approx(expected)


def test_binary(tmp_path):
    labels = _labels(100, k=2)
    probs = _probs(labels, 2, 1.0, 5)
    a = _write(tmp_path / "a.csv", labels, probs, BINARY)
    b = _write(tmp_path / "b.csv", labels, _probs(labels, 2, 2.0, 6), BINARY)
    result = compare.compare_files(a, b, n_boot=200)
    assert result["macro_auc_a"]["value"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))


def test_refusals_name_both_files(tmp_path):
    labels = _labels(30)
    probs = _probs(labels, 3, 1.0, 1)
    a = _write(tmp_path / "a.csv", labels, probs)
    other_ids = [f"P{i:04d}" for i in range(29)] + ["Q0001"]
    b_ids = _write(tmp_path / "b_ids.csv", labels, probs, ids=other_ids)
    flipped = labels.copy()
    flipped[7] = (flipped[7] + 1) % 3
    b_label = _write(tmp_path / "b_label.csv", flipped, probs)
    b_classes = _write(tmp_path / "b_classes.csv", labels % 2, _probs(labels % 2, 2, 1.0, 1),
                       BINARY)
    cases = [(b_ids, r"only in .*a\.csv: P0029; only in .*b_ids\.csv: Q0001"),
             (b_label, r"true label differs for patients P0007"),
             (b_classes, r"different classes")]
    for b, pattern in cases:
        with pytest.raises(Her2jaxError, match=pattern) as info:
            compare.compare_files(a, b, n_boot=10)
        assert str(a) in str(info.value) and str(b) in str(info.value)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "her2jax.cli.compare", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli(tmp_path):
    labels = _labels(200)
    a = _write(tmp_path / "a.csv", labels, _probs(labels, 3, 0.3, 1))
    b = _write(tmp_path / "b.csv", labels, _probs(labels, 3, 2.5, 2))
    out = tmp_path / "cmp" / "comparison.json"
    done = _cli(f"--a={a}", f"--b={b}", "--bootstrap=500", "--noprogress", f"--out={out}")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith("macro-average AUC A 0.")
    assert "; difference +0." in line and line.endswith("p = 0.004")  # 2 / 501
    saved = json.loads(out.read_text())
    assert saved["files"] == {"a": str(a), "b": str(b)} and saved["bootstrap"]["n_boot"] == 500

    flipped = labels.copy()
    flipped[3] = (flipped[3] + 1) % 3
    c = _write(tmp_path / "c.csv", flipped, _probs(labels, 3, 2.5, 2))
    refused = _cli(str(a), str(c), "--bootstrap=50", "--noprogress")   # positional form
    assert refused.returncode == 2
    assert refused.stdout == ""
    err = refused.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compare.py: error: ")
    assert str(a) in err[0] and str(c) in err[0] and "P0003" in err[0]
