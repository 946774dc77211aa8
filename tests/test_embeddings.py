"""Embeddings analysis: t-SNE / UMAP maps, silhouettes, the domain-shift warning, the plots."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from her2jax.analysis import embeddings
from her2jax.errors import Her2jaxError

CLASS_NAMES = ("zero", "low", "positive")


def _blobs(n_per=30, n_features=64, seed=0, separate="class"):
    """Three classes x three centres; either the classes or the centres form tight clusters."""
    rng = np.random.default_rng(seed)
    n = 3 * n_per
    labels = np.repeat(np.arange(3), n_per)
    centers = np.array([f"CENTER_{'ABC'[i]}" for i in rng.permutation(n) % 3])
    codes = labels if separate == "class" else np.searchsorted(np.unique(centers), centers)
    means = rng.normal(0, 1, (3, n_features)) * 6.0
    features = means[codes] + rng.normal(0, 1, (n, n_features))
    return features.astype(np.float32), labels, centers


def _write_npz(path, features, labels, centers, start=0):
    n = len(labels)
    np.savez(path, features=features, probs=np.full((n, 3), 1 / 3, np.float32),
             labels=labels, patient_ids=np.asarray([f"P{start + i:03d}" for i in range(n)]),
             centers=np.asarray(centers), class_names=np.asarray(CLASS_NAMES))
    return path


def _knn_accuracy(coords, labels):
    return cross_val_score(KNeighborsClassifier(5), coords, labels, cv=5).mean()


def test_separated_classes_give_high_silhouette_and_no_warning():
    features, labels, centers = _blobs()
    s = embeddings.silhouettes(features, labels, centers)
    assert s["by_class"] > 0.5
    assert s["by_center"] < 0.1
    assert not embeddings.domain_shift(s)


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_embedding_separates_classes_and_is_deterministic(method):
    features, labels, _ = _blobs()
    coords = embeddings.embed(features, method=method, seed=3)
    assert coords.shape == (len(labels), 2) and coords.dtype == np.float32
    assert _knn_accuracy(coords, labels) > 0.9
    np.testing.assert_array_equal(coords, embeddings.embed(features, method=method, seed=3))


def test_analyze_flags_centre_clusters_and_writes_pngs(tmp_path):
    features, labels, centers = _blobs(separate="center", seed=1)
    labels = labels.copy()
    labels[::7] = -1  # some unknown labels: left out of by_class, drawn grey
    paths = [_write_npz(tmp_path / "val.npz", features[:40], labels[:40], centers[:40]),
             _write_npz(tmp_path / "test.npz", features[40:], labels[40:], centers[40:], 40)]
    summary = embeddings.analyze_embeddings(paths, tmp_path / "analysis", seed=0)
    assert summary["n"] == 90
    assert summary["silhouette"]["by_center"] > 0.5
    assert summary["silhouette"]["by_class"] < 0.1
    assert summary["domain_shift_warning"] is True
    assert summary["embedding_skipped"] is None
    assert sorted(summary["files"]) == ["tsne_center.png", "tsne_class.png",
                                        "umap_center.png", "umap_class.png"]
    for name in summary["files"]:
        path = tmp_path / "analysis" / name
        assert path.stat().st_size > 0
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_load_features_concatenates_splits(tmp_path):
    features, labels, centers = _blobs(n_per=4, n_features=8)
    paths = [_write_npz(tmp_path / "val.npz", features[:5], labels[:5], centers[:5]),
             _write_npz(tmp_path / "test.npz", features[5:], labels[5:], centers[5:], 5)]
    data = embeddings.load_features(paths)
    np.testing.assert_array_equal(data["features"], features)
    np.testing.assert_array_equal(data["labels"], labels)
    np.testing.assert_array_equal(data["centers"], centers)
    assert list(data["split"]) == ["val"] * 5 + ["test"] * 7
    assert data["patient_ids"][5] == "P005"
    assert data["class_names"] == CLASS_NAMES


def test_load_features_rejects_mismatched_files(tmp_path):
    features, labels, centers = _blobs(n_per=2, n_features=8)
    a = _write_npz(tmp_path / "a.npz", features, labels, centers)
    b = _write_npz(tmp_path / "b.npz", features[:, :4], labels, centers)
    with pytest.raises(Her2jaxError, match="b.npz.*4 features"):
        embeddings.load_features([a, b])
    with pytest.raises(Her2jaxError, match="missing.npz"):
        embeddings.load_features([tmp_path / "missing.npz"])
    with pytest.raises(Her2jaxError, match="no features"):
        embeddings.load_features([])


def test_degenerate_inputs(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4, 6)).astype(np.float32)
    # One class, one centre: both silhouettes undefined.
    s = embeddings.silhouettes(features, np.zeros(4, int), np.array(["A"] * 4))
    assert s == {"by_class": None, "by_center": None}
    assert not embeddings.domain_shift(s)
    # A group of one member, and all labels unknown.
    s = embeddings.silhouettes(features, np.array([0, 0, 0, 1]), np.array(["A", "A", "B", "B"]))
    assert s["by_class"] is None and s["by_center"] is not None
    s = embeddings.silhouettes(features, np.full(4, -1), np.array(["A", "A", "B", "B"]))
    assert s["by_class"] is None
    # Too few rows to embed: a clear user error, and analyze skips the plots.
    with pytest.raises(Her2jaxError, match="too few"):
        embeddings.embed(features, method="tsne")
    with pytest.raises(Her2jaxError, match="unknown embedding method"):
        embeddings.embed(features, method="pca")
    path = _write_npz(tmp_path / "tiny.npz", features, np.zeros(4, int), ["A"] * 4)
    summary = embeddings.analyze_embeddings([path], tmp_path / "out")
    assert summary["files"] == [] and "too few" in summary["embedding_skipped"]
    assert summary["domain_shift_warning"] is False


def test_smallest_embedding_works():
    features = np.random.default_rng(0).normal(size=(embeddings.MIN_EMBED_ROWS, 3))
    for method in embeddings.METHODS:
        coords = embeddings.embed(features, method=method)
        assert coords.shape == (embeddings.MIN_EMBED_ROWS, 2) and np.isfinite(coords).all()


def test_import_is_cheap():
    import subprocess
    import sys

    code = ("import sys, her2jax.analysis.embeddings; "
            "assert 'umap' not in sys.modules and 'numba' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
