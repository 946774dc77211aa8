"""Reliability / ECE, the reliability diagram, and temperature scaling (fit on val, apply on test)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from her2jax.errors import Her2jaxError
from her2jax.evaluate import calibration, metrics
from her2jax.labels import CLASS_NAMES

THREE = CLASS_NAMES["her2_3class"]


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))


def calibrated_cases(n: int, scale: float, seed: int):
    """Labels drawn from softmax(z), returned with softmax(scale * z): calibrated at scale 1,
    over-confident above 1 (the true temperature is then ``scale``)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.5, size=(n, 3))
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.minimum((rng.uniform(size=(n, 1)) > np.cumsum(true, axis=1)).sum(axis=1), 2)
    shown = np.exp(scale * logits)
    return labels, logits, shown / shown.sum(axis=1, keepdims=True)


def test_reliability_hand_computed():
    # Top confidences .85 .55 .65 .65 .75 .95 with correct T T F F T T (the metrics 6-case set).
    p = np.array([0.15, 0.45, 0.65, 0.35, 0.75, 0.95])
    labels, probs = np.array([0, 0, 0, 1, 1, 1]), np.stack([1 - p, p], axis=1)
    r = calibration.reliability(labels, probs)
    assert r["count"] == [0, 0, 0, 0, 0, 1, 2, 1, 1, 1]
    assert r["confidence"][:5] == [None] * 5 and r["accuracy"][:5] == [None] * 5
    assert r["confidence"][5:] == pytest.approx([0.55, 0.65, 0.75, 0.85, 0.95])
    assert r["accuracy"][5:] == pytest.approx([1, 0, 1, 1, 1])
    assert r["ece"] == pytest.approx(2.2 / 6)
    assert r["bin_edges"] == pytest.approx(np.linspace(0, 1, 11))
    # Class 1's curve bins p1 against labels == 1: .15 -> bin 1 (freq 0), .35 -> 3 (freq 1), ...
    assert r["per_class"][1]["count"] == [0, 1, 0, 1, 1, 0, 1, 1, 0, 1]
    assert r["per_class"][1]["accuracy"][3] == 1.0 and r["per_class"][1]["accuracy"][6] == 0.0
    assert metrics.summarize(labels, probs, CLASS_NAMES["her2_binary"], n_boot=0)["ece"] == \
        pytest.approx(r["ece"])
    assert calibration.reliability(labels, probs, n_bins=1)["ece"] == pytest.approx(
        abs(4 / 6 - np.mean([0.85, 0.55, 0.65, 0.65, 0.75, 0.95])))
    assert calibration.reliability(np.zeros(0, int), np.zeros((0, 3)))["ece"] is None


def test_temperature_scaling_reduces_nll_on_overconfident_and_is_one_when_calibrated():
    labels, _, over = calibrated_cases(4000, scale=2.5, seed=0)
    t = calibration.fit_temperature(labels, over)
    assert t == pytest.approx(2.5, rel=0.15)  # the scale the probabilities were sharpened by
    fixed = calibration.apply_temperature(over, t)
    np.testing.assert_allclose(fixed.sum(axis=1), 1.0)
    assert nll(labels, fixed) < nll(labels, over) - 0.05
    assert (calibration.reliability(labels, fixed)["ece"]
            < calibration.reliability(labels, over)["ece"])

    labels, logits, probs = calibrated_cases(4000, scale=1.0, seed=1)
    assert calibration.fit_temperature(labels, probs) == pytest.approx(1.0, abs=0.1)
    # Logits and their probabilities (log p = logits + const per row) give the same T.
    assert calibration.fit_temperature(labels, logits) == pytest.approx(
        calibration.fit_temperature(labels, probs), rel=1e-4)
    np.testing.assert_allclose(calibration.apply_temperature(probs, 1.0), probs, atol=1e-12)


def test_temperature_fitted_on_validation_applies_to_test():
    val_labels, _, val_probs = calibrated_cases(3000, scale=0.4, seed=2)  # under-confident
    test_labels, _, test_probs = calibrated_cases(3000, scale=0.4, seed=3)
    t = calibration.fit_temperature(val_labels, val_probs)
    assert t < 1.0
    assert nll(test_labels, calibration.apply_temperature(test_probs, t)) < nll(test_labels,
                                                                                 test_probs)
    with pytest.raises(Her2jaxError):
        calibration.apply_temperature(test_probs, 0.0)


def test_plot_reliability_writes_a_real_png(tmp_path):
    labels, _, probs = calibrated_cases(300, scale=2.0, seed=4)
    path = tmp_path / "analysis" / "reliability.png"
    calibration.plot_reliability(path, labels, probs, THREE)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 0 and image.size[1] > 0
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # not one colour
