"""Per-centre and subgroup AUC tables (evaluate.tables)."""

from __future__ import annotations

import numpy as np
import pytest

from her2jax.errors import Her2jaxError
from her2jax.evaluate import files, metrics, tables
from her2jax.labels import CLASS_NAMES

THREE = list(CLASS_NAMES["her2_3class"])


def _frame(tmp_path):
    """A predictions.csv written and read back: centres A (60), B (5), C (12, one class),
    a few unlabelled cases, and an ``er`` column with empty values."""
    rng = np.random.default_rng(0)
    centers = ["A"] * 60 + ["B"] * 5 + ["C"] * 12 + ["A"] * 3
    labels = np.concatenate([rng.integers(0, 3, 60), [0, 1, 2, 0, 1], [1] * 12, [-1] * 3])
    labels[:6] = [0, 1, 2, 0, 1, 2]
    logits = rng.normal(size=(len(labels), 3))
    logits[np.arange(len(labels)), np.maximum(labels, 0)] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    er = ["positive" if i % 3 else "negative" for i in range(len(labels))]
    for i in range(0, len(labels), 7):
        er[i] = ""
    path = tmp_path / "predictions.csv"
    files.write_predictions(path, patient_ids=[f"P{i:03d}" for i in range(len(labels))],
                            centers=centers, labels=labels, probs=probs, class_names=THREE,
                            clinical={"er": er})
    return files.read_predictions(path), labels, probs, np.array(centers), np.array(er)


def test_per_center_rows_and_pooled(tmp_path):
    frame, labels, probs, centers, _ = _frame(tmp_path)
    rows = tables.per_center(frame, THREE, n_boot=200, seed=1)
    assert [row["group"] for row in rows] == ["A", "B", "C", "pooled"]
    by_group = {row["group"]: row for row in rows}
    keep = labels >= 0
    assert by_group["A"]["n"] == 60 and by_group["pooled"]["n"] == 77
    for group, mask in (("A", (centers == "A") & keep), ("pooled", keep)):
        expected = metrics.summarize(labels[mask], probs[mask], THREE, n_boot=200, seed=1)
        row = by_group[group]
        assert row["macro_auc"] == expected["macro_auc"]
        assert row["micro_auc"] == expected["micro_auc"]
        assert row["per_class_auc"] == expected["per_class_auc"]
        assert row["note"] == ""
        assert row["macro_auc"]["ci_low"] < row["macro_auc"]["value"] < row["macro_auc"]["ci_high"]


def test_small_and_single_class_groups_have_no_metrics(tmp_path):
    frame, *_ = _frame(tmp_path)
    by_group = {row["group"]: row for row in tables.per_center(frame, THREE, n_boot=50)}
    small, single = by_group["B"], by_group["C"]
    assert small["n"] == 5 and small["note"] == "n=5: too small for a CI"
    assert single["n"] == 12 and single["note"] == "only HER2-low present: AUC undefined"
    for row in (small, single):
        assert row["macro_auc"] is None and row["micro_auc"] is None
        assert row["per_class_auc"] is None
    # min_n=4 summarises centre B.
    by_group = {row["group"]: row for row in tables.per_center(frame, THREE, n_boot=50, min_n=4)}
    assert by_group["B"]["macro_auc"]["value"] is not None and by_group["B"]["note"] == ""


def test_subgroups_with_missing_values(tmp_path):
    frame, labels, probs, _, er = _frame(tmp_path)
    rows = tables.subgroups(frame, THREE, ["er"], n_boot=100)
    assert [(row["column"], row["value"]) for row in rows] == [
        ("er", "negative"), ("er", "positive"), ("er", "(missing)")]
    keep = labels >= 0
    counts = {row["value"]: row["n"] for row in rows}
    assert counts == {"negative": int(np.sum(keep & (er == "negative"))),
                      "positive": int(np.sum(keep & (er == "positive"))),
                      "(missing)": int(np.sum(keep & (er == "")))}
    assert sum(counts.values()) == 77
    missing = rows[-1]
    mask = keep & (er == "")
    expected = metrics.summarize(labels[mask], probs[mask], THREE, n_boot=100, seed=0)
    assert missing["macro_auc"] == expected["macro_auc"]


def test_unknown_column_is_refused(tmp_path):
    frame, *_ = _frame(tmp_path)
    with pytest.raises(Her2jaxError, match="no clinical column 'age'"):
        tables.subgroups(frame, THREE, ["age"], n_boot=10)


def test_markdown(tmp_path):
    frame, *_ = _frame(tmp_path)
    rows = tables.per_center(frame, THREE, n_boot=100)
    text = tables.to_markdown(rows)
    lines = text.splitlines()
    assert lines[0] == "| group | n | macro AUC (95% CI) | micro AUC (95% CI) | note |"
    assert len(lines) == 2 + len(rows)
    pooled = rows[-1]
    macro = pooled["macro_auc"]
    assert (f"| pooled | 77 | {macro['value']:.3f} "
            f"({macro['ci_low']:.3f}\u2013{macro['ci_high']:.3f}) |") in text
    assert "| B | 5 | n/a | n/a | n=5: too small for a CI |" in text
    assert "only HER2-low present: AUC undefined" in text
    sub = tables.to_markdown(tables.subgroups(frame, THREE, ["er"], n_boot=20))
    assert "| er = (missing) |" in sub and "| er = positive |" in sub
