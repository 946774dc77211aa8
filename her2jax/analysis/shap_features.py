"""The study's feature-space SHAP: KernelExplainer on the PCA components of the encoder features.

FM-BCMRI's protocol reduces the frozen encoder's features to 16 principal components and fits a
logistic regression on them; the study explains that classifier with SHAP's KernelExplainer on
those 16 components. ``explain`` reproduces it from ``features/<split>.npz`` dicts (as
``embeddings.load_features`` returns them):

1. fit ``pca_lr.make_sklearn`` (StandardScaler -> PCA -> LogisticRegression) on the labelled
   training rows, with ``k = min(n_components, n_labelled, n_features)`` components, exactly as
   ``pca_lr.fit`` does;
2. the explained model is the classifier as a function of the k PCA scores, [M, k] -> [M, K]
   probabilities (``PcaLr.predict_proba`` with an identity "PCA", so the softmax / sigmoid and
   the zero column of a class the regression never saw are the protocol's own code);
3. the background is a seeded sample (without replacement) of ``background`` training rows in
   PCA space (all of them when there are fewer). A sample rather than ``shap.kmeans``: the base
   value is then the mean predicted probability over real cases, which centroids of a
   non-linear model's inputs do not give;
4. ``KernelExplainer.shap_values`` for the rows to explain, with ``l1_reg=False``: shap's
   default (``"num_features(10)"``) would zero all but 10 of the 16 components.

KernelExplainer samples coalitions with numpy's global generator; ``explain`` seeds it from
``seed`` and restores the caller's state afterwards, so a seed gives the same values.
The values are additive: ``base_values[c] + values[i, :, c].sum() == probs[i, c]`` (exactly,
up to float error, since the sum constraint is built into the kernel regression).

``plot`` writes, per class, a beeswarm and a bar chart of the values (``shap.plots``, Agg).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from her2jax.analysis import numba_cache
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files


def _labelled(train: dict) -> tuple[np.ndarray, np.ndarray]:
    try:
        features = np.asarray(train["features"], np.float64)
        labels = np.asarray(train["labels"], np.int64)
    except KeyError as e:
        raise Her2jaxError(f"the training rows lack {e}; pass load_features' dict") from None
    if features.ndim != 2 or len(labels) != len(features):
        raise Her2jaxError(f"training features must be [N, F] with N labels; got features "
                           f"{features.shape} and {len(labels)} labels")
    known = labels >= 0
    return features[known], labels[known]


def _fit(x: np.ndarray, y: np.ndarray, class_names: Sequence[str], *, n_components: int,
         seed: int, balanced: bool):
    """The protocol's classifier (a ``PcaLr``) fitted on [N, F] features."""
    from her2jax.train.pca_lr import PcaLr, make_sklearn

    k = min(int(n_components), *x.shape)
    fitted = make_sklearn(k, seed=seed, balanced=balanced).fit(x, y)
    return PcaLr.from_sklearn(fitted, class_names, encoder="features", n_train=len(x))


def _on_components(classifier):
    """The classifier as a function of its k PCA scores: [M, k] -> [M, K] probabilities."""
    k = classifier.n_components
    identity = dataclasses.replace(classifier, scaler_mean=np.zeros(k), scaler_scale=np.ones(k),
                                   pca_mean=np.zeros(k), pca_components=np.eye(k))
    return identity.predict_proba


def explain(train: dict, explain_rows: dict, class_names: Sequence[str], *,
            n_components: int = 16, background: int = 50, nsamples: int | str = "auto",
            seed: int = 0, balanced: bool = True, progress: bool = True) -> dict:
    """SHAP values of the PCA + logistic regression classifier on its principal components.

    Args:
      train: ``{"features": [N, F], "labels": [N] int (-1 unknown)}``; the labelled rows fit
        the classifier and give the background.
      explain_rows: ``{"features": [M, F]}``, the cases to explain (e.g. a test centre).
      class_names: the scheme's K class names (the probability columns).
      n_components: PCA components (the study: 16), capped by the labelled rows and features.
      background: training rows sampled (seeded) as the KernelExplainer background.
      nsamples: model evaluations per explained row (shap's "auto" = 2 P + 2048).
      seed: seeds the PCA, the regression, the background sample and shap's coalitions.
      balanced: ``class_weight='balanced'`` in the regression (the study's config).
      progress: show KernelExplainer's tqdm bar over the explained rows.

    Returns:
      ``{"values": [M, P, K] float64, "base_values": [K], "data": [M, P] PCA scores,
      "probs": [M, K] predicted probabilities, "feature_names": ["PC1", ...],
      "explained_variance_ratio": [P], "class_names": tuple, "mean_abs": {class: [P]}}``
      with P the number of components kept.

    Raises:
      Her2jaxError: malformed inputs, fewer than two classes among the labelled training rows,
        a feature width that differs between train and the rows to explain, or no rows.
    """
    shap = numba_cache.import_cached("shap")

    class_names = tuple(str(c) for c in class_names)
    x, y = _labelled(train)
    present = np.unique(y)
    if len(present) < 2:
        raise Her2jaxError(f"the labelled training rows hold {len(present)} class(es) "
                           f"({[class_names[c] for c in present if c < len(class_names)]}); "
                           "SHAP needs a classifier fitted on at least two")
    if present.max() >= len(class_names):
        raise Her2jaxError(f"training label {present.max()} has no class name in "
                           f"{list(class_names)}")
    if not np.isfinite(x).all():
        raise Her2jaxError("training features contain NaN or infinite values")
    rows = np.asarray(explain_rows["features"], np.float64)
    if rows.ndim != 2 or rows.shape[1] != x.shape[1] or len(rows) == 0:
        raise Her2jaxError(f"rows to explain must be [M >= 1, {x.shape[1]}] like the training "
                           f"features; got {rows.shape}")
    if int(background) < 1:
        raise Her2jaxError(f"background must be at least 1 row, got {background}")

    classifier = _fit(x, y, class_names, n_components=n_components, seed=seed,
                      balanced=balanced)
    predict = _on_components(classifier)
    z_train, z_rows = classifier.transform(x), classifier.transform(rows)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(z_train), min(int(background), len(z_train)),
                                replace=False))
    names = [f"PC{i + 1}" for i in range(classifier.n_components)]

    # KernelExplainer draws coalitions from numpy's global generator: seed it, then restore.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        explainer = shap.KernelExplainer(predict, z_train[chosen], feature_names=names)
        values = explainer.shap_values(z_rows, nsamples=nsamples, l1_reg=False,
                                       silent=not progress)
    finally:
        np.random.set_state(state)
    values = np.asarray(values, np.float64).reshape(len(z_rows), len(names), len(class_names))
    mean_abs = np.abs(values).mean(axis=0)
    return {"values": values,
            "base_values": np.asarray(explainer.expected_value, np.float64).reshape(-1),
            "data": z_rows, "probs": predict(z_rows), "feature_names": names,
            "explained_variance_ratio": classifier.explained_variance_ratio,
            "class_names": class_names,
            "mean_abs": {c: mean_abs[:, i] for i, c in enumerate(class_names)}}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def plot(result: dict, out_dir, class_names: Sequence[str]) -> list[Path]:
    """Per class, a beeswarm and a bar chart of ``explain``'s values.

    Args:
      result: ``explain``'s dict.
      out_dir: folder for ``shap_beeswarm_<class>.png`` and ``shap_bar_<class>.png``.
      class_names: the K class names, in ``result``'s column order.

    Returns:
      The written paths, beeswarm then bar for each class in order.
    """
    import matplotlib

    matplotlib.use("Agg")   # files only; no display needed
    import matplotlib.pyplot as plt
    shap = numba_cache.import_cached("shap")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    values = np.asarray(result["values"])
    n_features = values.shape[1]
    if values.shape[2] != len(class_names):
        raise Her2jaxError(f"{len(class_names)} class names for {values.shape[2]} SHAP output "
                           "columns")
    written = []
    for c, name in enumerate(class_names):
        explanation = shap.Explanation(
            values=values[:, :, c], data=np.asarray(result["data"]),
            base_values=np.full(len(values), result["base_values"][c]),
            feature_names=list(result["feature_names"]))
        for kind, draw, extra in (("beeswarm", shap.plots.beeswarm, {"plot_size": None}),
                                  ("bar", shap.plots.bar, {})):
            # shap's own sizing (8 x rows) but on our figure: it refuses a size with an axis.
            fig = plt.figure(figsize=(8, 0.4 * n_features + 1.5))
            try:
                draw(explanation, max_display=n_features, ax=fig.gca(), show=False, **extra)
                ax = fig.axes[0]
                ax.set_title(f"SHAP on PCA components: P({name})")
                path = out_dir / f"shap_{kind}_{_slug(name)}.png"
                files.write_figure(path, fig, dpi=100, bbox_inches="tight")
            finally:
                plt.close(fig)
            written.append(path)
    return written
