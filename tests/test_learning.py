"""The held-out claim, small: configs/demo_cpu.py trained on two centres learns a signal that
transfers to the third, far above its permuted-label control and near the hand-made kinetic
baseline fitted on the same patients.

A small version of benchmarks/bench_learning.py (BENCHMARKS.md, "Learning"): 150 patients at
64x64x32, CENTER_C held out, 600 steps. The margins come from five training seeds on this
cohort (BENCHMARKS.md, "The fast version in the test suite").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATIENTS, SHAPE, STEPS = 150, (64, 64, 32), 600
HELD_OUT = "CENTER_C"
# Five training seeds at 2 mm (BENCHMARKS.md): held-out model 0.759-0.776 against the
# baseline's 0.790 (model - baseline -0.030 to -0.014), permuted labels 0.430-0.615, real -
# permuted 0.158 or more, final training loss 0.43-0.86. Each bound is the worst seed plus a
# margin of ~0.04-0.08 (the same bounds held the 2.5 mm demo's seeds: -0.035, 0.612, 0.149, 0.86).
MODEL_VS_BASELINE = -0.07
PERMUTED_MAX = 0.68
REAL_OVER_PERMUTED = 0.08
LOSS_MAX = 0.95      # ln 3 = 1.10 is chance


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_learning", REPO / "benchmarks" / "bench_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from her2jax.data import phantom

    return phantom.write_cohort(tmp_path_factory.mktemp("learning") / "cohort",
                                patients=PATIENTS, centers=3, seed=1, shape=SHAPE)


@pytest.mark.slow
def test_the_demo_model_learns_what_transfers_to_an_unseen_centre(cohort, tmp_path):
    bench = _bench()
    real = bench.run_one("demo", cohort, tmp_path, HELD_OUT, permute=False, steps=STEPS,
                         seed=0, n_boot=200)
    permuted = bench.run_one("demo", cohort, tmp_path, HELD_OUT, permute=True, steps=STEPS,
                             seed=0, n_boot=200)
    model, baseline = real["model"]["value"], real["baseline"]["value"]
    assert baseline > 0.70, f"the phantom lost its signal: baseline {baseline:.3f}"
    assert model >= baseline + MODEL_VS_BASELINE, f"model {model:.3f}, baseline {baseline:.3f}"
    assert real["final_train_loss"] < LOSS_MAX, real
    assert permuted["model"]["value"] <= PERMUTED_MAX, permuted
    assert model - permuted["model"]["value"] > REAL_OVER_PERMUTED, (real, permuted)


def test_the_study_summary_checks_the_goal_per_centre_and_on_the_mean():
    bench = _bench()

    def row(center, model, baseline, permute=False, data_seed=0):
        auc = lambda v: dict(value=v, ci_low=v - 0.05, ci_high=v + 0.05)  # noqa: E731
        return dict(candidate="demo", held_out=center, permuted_labels=permute,
                    data_seed=data_seed, model=auc(model), pca_lr=auc(0.5),
                    baseline=auc(baseline), train_s=10.0)

    rows = [row("A", 0.80, 0.82), row("B", 0.75, 0.70), row("A", 0.55, 0.6, permute=True),
            row("A", 0.63, 0.6, permute=True, data_seed=1),
            row("B", 0.52, 0.5, permute=True)]
    real, permuted = bench.summarize(rows)
    assert (real["model_mean"], real["baseline_mean"]) == (0.775, 0.76)
    assert real["every_center_within_0_03"] and real["mean_at_least_baseline"]
    # the control: each centre's mean over its permutations, every one at most 0.60
    assert permuted["permuted_labels"] and permuted["centers"] == ["A", "B"]
    assert permuted["model"] == {"A": 0.59, "B": 0.52} and permuted["runs"] == 3
    assert permuted["every_center_at_most_0_60"]
    rows[3] = row("A", 0.67, 0.6, permute=True, data_seed=1)    # A's mean 0.61
    assert not bench.summarize(rows)[1]["every_center_at_most_0_60"]
    rows[0] = row("A", 0.78, 0.82)    # 0.04 behind on A: the per-centre goal fails
    assert not bench.summarize(rows)[0]["every_center_within_0_03"]
    table = bench.markdown(rows)
    assert "| demo | real | A | 0.780 (0.730-0.830) |" in table
    assert "| demo | permuted #1 | A | 0.670 (0.620-0.720) |" in table


def test_several_training_seeds_give_their_mean_and_their_ensemble(tmp_path):
    """--seeds: the model's AUC per centre is the mean over seeds; the ensemble is the AUC of
    the mean of the seeds' probabilities per patient (checked against scikit-learn)."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    bench = _bench()
    rng = np.random.default_rng(0)
    names = ["HER2-zero", "HER2-low", "HER2-positive"]
    labels = np.arange(60) % 3
    probs, rows = [], []
    for seed in (0, 1, 2):
        # each seed a noisy view of the truth: their mean is better than each alone
        logits = 1.5 * np.eye(3)[labels] + rng.normal(0, 1.2, (60, 3))
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        probs.append(p)
        workdir = tmp_path / f"seed{seed}"
        (workdir / "eval" / "test_A").mkdir(parents=True)
        order = rng.permutation(60)          # rows in another order in each file
        pd.DataFrame({"patient_id": [f"P{i:03d}" for i in order], "center": "A",
                      "label": [names[k] for k in labels[order]],
                      **{f"prob_{n}": p[order, k] for k, n in enumerate(names)}}).to_csv(
            workdir / "eval" / "test_A" / "predictions.csv", index=False)
        auc = float(roc_auc_score(labels, p, multi_class="ovr", average="macro"))
        rows.append(dict(candidate="demo", held_out="A", permuted_labels=False, data_seed=0,
                         seed=seed, workdir=str(workdir),
                         model=dict(value=auc, ci_low=0.0, ci_high=1.0),
                         pca_lr=dict(value=0.5, ci_low=0.4, ci_high=0.6),
                         baseline=dict(value=0.7, ci_low=0.6, ci_high=0.8), train_s=1.0))
    (line,) = bench.summarize(rows, n_boot=50)
    singles = [r["model"]["value"] for r in rows]
    want = roc_auc_score(labels, np.mean(probs, axis=0), multi_class="ovr", average="macro")
    assert line["seeds"] == [0, 1, 2]
    assert line["model"]["A"] == pytest.approx(np.mean(singles), abs=1e-4)
    assert line["ensemble"]["A"]["value"] == pytest.approx(want, abs=1e-4)
    assert line["ensemble"]["A"]["value"] > max(singles)
    assert line["ensemble_mean"] == pytest.approx(want, abs=1e-4)
    assert line["ensemble_mean_at_least_baseline"] == (want >= 0.7)
    assert "| demo | real, seed 2 | A |" in bench.markdown(rows)
    # runs that scored different patients are not averaged
    other = tmp_path / "seed1" / "eval" / "test_A" / "predictions.csv"
    table = pd.read_csv(other)
    table.loc[0, "patient_id"] = "P999"
    table.to_csv(other, index=False)
    with pytest.raises(ValueError, match="different patients"):
        bench.summarize(rows, n_boot=50)
