"""Feature-space SHAP: KernelExplainer on the PCA components of the pca_lr classifier."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from her2jax.analysis import shap_features
from her2jax.errors import Her2jaxError

CLASS_NAMES = ("zero", "low", "positive")


def _features(n=120, n_features=20, seed=0):
    """Five strongly correlated features carry the class (their common direction is PC1);
    the other fifteen are independent noise, so every other component is noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    latent = 2.0 * (labels - 1) + rng.normal(0, 0.5, n)
    signal = latent[:, None] + rng.normal(0, 0.2, (n, 5))
    noise = rng.normal(0, 1, (n, n_features - 5))
    features = np.concatenate([signal, noise], axis=1).astype(np.float32)
    labels = labels.copy()
    labels[:6] = -1   # a few unknown labels must be ignored
    return {"features": features, "labels": labels}


@pytest.fixture(scope="module")
def data():
    return _features(), _features(n=15, seed=1)


@pytest.fixture(scope="module")
def result(data):
    train, rows = data
    return shap_features.explain(train, rows, CLASS_NAMES, n_components=4, background=30,
                                 progress=False)


def test_signal_component_ranks_first(result):
    assert result["feature_names"] == ["PC1", "PC2", "PC3", "PC4"]
    assert result["values"].shape == (15, 4, 3)
    assert result["data"].shape == (15, 4)
    for name in CLASS_NAMES:
        mean_abs = result["mean_abs"][name]
        assert mean_abs.shape == (4,)
        assert int(np.argmax(mean_abs)) == 0, (name, mean_abs)
        # the noise components matter far less than the class direction
        assert mean_abs[1:].max() < 0.5 * mean_abs[0], (name, mean_abs)
    assert result["explained_variance_ratio"][0] > 0.2


def test_additive_per_row_and_class(result):
    total = result["base_values"][None, :] + result["values"].sum(axis=1)
    np.testing.assert_allclose(total, result["probs"], atol=1e-6)
    np.testing.assert_allclose(result["probs"].sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(result["base_values"].sum(), 1.0, atol=1e-9)


def test_probabilities_match_sklearn_pipeline(data, result):
    from her2jax.train.pca_lr import make_sklearn

    train, rows = data
    known = train["labels"] >= 0
    fitted = make_sklearn(4, seed=0, balanced=True).fit(
        train["features"][known].astype(np.float64), train["labels"][known])
    np.testing.assert_allclose(result["probs"],
                               fitted.predict_proba(rows["features"].astype(np.float64)),
                               atol=1e-8)


def test_sampled_coalitions_deterministic_for_a_seed(data):
    train, rows = data
    rows = {"features": rows["features"][:4]}
    kwargs = dict(n_components=10, background=10, nsamples=60, progress=False)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = shap_features.explain(train, rows, CLASS_NAMES, seed=3, **kwargs)
    np.testing.assert_array_equal(np.random.get_state()[1], before)   # caller's state kept
    b = shap_features.explain(train, rows, CLASS_NAMES, seed=3, **kwargs)
    c = shap_features.explain(train, rows, CLASS_NAMES, seed=4, **kwargs)
    np.testing.assert_array_equal(a["values"], b["values"])
    np.testing.assert_array_equal(a["base_values"], b["base_values"])
    assert not np.allclose(a["values"], c["values"])   # 2^10 coalitions: 60 are a sample
    # additive even when the coalitions are sampled
    np.testing.assert_allclose(a["base_values"] + a["values"].sum(axis=1), a["probs"],
                               atol=1e-6)


def test_components_capped_by_training_rows(data):
    _, rows = data
    train = _features(n=9)   # 6 unknown -> 3 labelled rows
    train["labels"][:6] = [0, 1, 2, 0, 1, 2]
    small = {"features": train["features"][:6], "labels": train["labels"][:6]}
    out = shap_features.explain(small, {"features": rows["features"][:2]}, CLASS_NAMES,
                                n_components=16, progress=False)
    assert out["values"].shape == (2, 6, 3)


def test_fewer_than_two_classes_raises(data):
    train, rows = data
    one = dict(train, labels=np.where(train["labels"] == 1, 1, -1))
    with pytest.raises(Her2jaxError, match="at least two"):
        shap_features.explain(one, rows, CLASS_NAMES, n_components=4, progress=False)


def test_width_mismatch_raises(data):
    train, rows = data
    with pytest.raises(Her2jaxError, match="rows to explain"):
        shap_features.explain(train, {"features": rows["features"][:, :5]}, CLASS_NAMES,
                              n_components=4, progress=False)


def test_plots_are_png_per_class(result, tmp_path):
    paths = shap_features.plot(result, tmp_path / "shap", CLASS_NAMES)
    assert [p.name for p in paths] == [f"shap_{kind}_{c}.png" for c in CLASS_NAMES
                                       for kind in ("beeswarm", "bar")]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 100 and image.height > 100
            lo, hi = image.convert("L").getextrema()
            assert lo < hi   # something was drawn


def test_plot_class_count_mismatch_raises(result, tmp_path):
    with pytest.raises(Her2jaxError, match="class names"):
        shap_features.plot(result, tmp_path, CLASS_NAMES[:2])
