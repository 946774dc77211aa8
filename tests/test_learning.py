"""The engine learns, without flakiness: one seed of benchmarks/bench_learning.py.

The threshold comes from five training seeds (BENCHMARKS.md, "Learning"): the lowest best
validation macro AUC minus a safety margin. The same run with permuted training labels must
stay near chance, so a pass cannot come from leakage or from the validation selection.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 0.60     # lowest of 5 seeds (0.654) minus a margin of ~0.05 (BENCHMARKS.md)
CHANCE_BAND = 0.10   # permuted labels: |AUC - 0.5| below this


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_learning", REPO / "benchmarks" / "bench_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def learning_data(tmp_path_factory) -> Path:
    return _bench().make_dataset(tmp_path_factory.mktemp("learning"), patients=300)


def test_validation_auc_clears_the_threshold_and_permuted_labels_do_not(learning_data,
                                                                        tmp_path):
    bench = _bench()
    real = bench.best_val_auc(learning_data, tmp_path / "real", seed=0, permute=False)
    permuted = bench.best_val_auc(learning_data, tmp_path / "permuted", seed=0, permute=True)
    assert real >= THRESHOLD, f"best validation macro AUC {real:.3f} < {THRESHOLD}"
    assert abs(permuted - 0.5) < CHANCE_BAND, f"permuted labels reached {permuted:.3f}"
    assert real - permuted > 0.05
