"""Calibration and thresholds fitted on the validation split and applied unchanged to the test."""

from __future__ import annotations

import numpy as np
import pytest

from her2jax.evaluate import calibration, decision

CLASSES = ("HER2-zero", "HER2-low", "HER2-positive")


def _overconfident(n: int, seed: int, sharpen: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), reported as softmax(sharpen * z): over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.0, (n, 3))
    true_p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in true_p])
    reported = np.exp(sharpen * z) / np.exp(sharpen * z).sum(1, keepdims=True)
    return labels, reported


def test_temperature_from_val_improves_calibration_on_test_and_keeps_decisions():
    val_labels, val_probs = _overconfident(800, seed=0)
    test_labels, test_probs = _overconfident(800, seed=1)
    fitted = decision.fit(val_labels, val_probs, CLASSES)
    assert fitted["fitted_on"] == "val" and fitted["n_val"] == 800
    assert fitted["temperature"] == pytest.approx(3.0, rel=0.15)  # undoes the sharpening
    assert fitted["threshold"] is None
    assert "validation split (n = 800)" in fitted["statement"]
    entry, calibrated = decision.apply(fitted, test_labels, test_probs)
    assert entry["ece_calibrated"] < entry["ece"] / 2
    assert entry["brier_calibrated"] < entry["brier"]
    np.testing.assert_array_equal(calibrated.argmax(1), test_probs.argmax(1))
    np.testing.assert_allclose(calibrated.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(calibrated, calibration.apply_temperature(
        test_probs, fitted["temperature"]))


def test_what_is_fitted_does_not_depend_on_the_test_labels():
    val_labels, val_probs = _overconfident(300, seed=2)
    fitted = decision.fit(val_labels, val_probs, CLASSES)
    test_labels, test_probs = _overconfident(300, seed=3)
    _, first = decision.apply(fitted, test_labels, test_probs)
    _, second = decision.apply(fitted, np.roll(test_labels, 7), test_probs)
    np.testing.assert_array_equal(first, second)


def test_binary_thresholds_come_from_val_and_are_applied_as_they_are():
    val_labels = np.array([0, 0, 0, 1, 1, 1])
    p_val = np.array([0.1, 0.3, 0.6, 0.4, 0.7, 0.9])
    fitted = decision.fit(val_labels, np.stack([1 - p_val, p_val], 1), ("negative", "positive"))
    # Youden on val: threshold 0.7 gives sens 2/3, spec 1 (J = 2/3); 0.4 gives 1, 2/3 (J = 2/3);
    # ties go to the highest threshold.
    assert fitted["threshold"]["youden"] == pytest.approx(0.7)
    # 90 % sensitivity needs all three positives: the highest threshold reaching it is 0.4.
    assert fitted["threshold"]["at_sensitivity"] == pytest.approx(0.4)
    assert "decision thresholds" in fitted["statement"]
    test_labels = np.array([0, 0, 1, 1, 1, 0])
    p_test = np.array([0.2, 0.75, 0.5, 0.8, 0.65, 0.45])
    entry, _ = decision.apply(fitted, test_labels, np.stack([1 - p_test, p_test], 1))
    youden = entry["at_val_thresholds"]["youden"]
    # >= 0.7 called positive: positives 0.5, 0.8, 0.65 -> 1 of 3; negatives 0.2, 0.75, 0.45 -> 2 of 3 right.
    assert youden["threshold"] == pytest.approx(0.7)
    assert youden["sensitivity"] == pytest.approx(1 / 3)
    assert youden["specificity"] == pytest.approx(2 / 3)
    at_sens = entry["at_val_thresholds"]["at_sensitivity"]
    assert at_sens["sensitivity"] == pytest.approx(1.0)      # all >= 0.4
    assert at_sens["specificity"] == pytest.approx(1 / 3)    # only 0.2 below


def test_without_a_validation_split_nothing_is_fitted():
    record = decision.not_fitted("no validation split was evaluated")
    assert record["temperature"] is None and record["splits"] == {}
    assert record["statement"].startswith("Not calibrated: no validation split")
