"""The analysis stage (``her2jax --mode=analyze``): embeddings and the study's SHAP.

From a trained workdir's ``features/<split>.npz`` (written first when missing):

* t-SNE and UMAP of the encoder features, coloured by class and by centre, with silhouette
  scores and the domain-shift warning (:mod:`embeddings`);
* feature-space SHAP as in the study: PCA + logistic regression fitted on the training
  features, KernelExplainer on the held-out cases (:mod:`shap_features`);
* ``analysis/summary.json`` tying it together.

Image-space SHAP and report.html build on this (see README: still to come).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from her2jax.analysis import embeddings, shap_features
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files
from her2jax.train import loop, pca_lr
from her2jax.train import workdir as workdir_lib

ANALYSIS_DIR = "analysis"
SUMMARY_FILE = "summary.json"


def _feature_files(workdir: Path, data_dir: str | None, which: str) -> dict[str, Path]:
    """split -> features/<split>.npz; extracts train, val and the test splits if missing."""
    found = {p.stem: p for p in sorted((workdir / "features").glob("*.npz"))}
    if "train" in found:
        return found
    if pca_lr.is_pca_lr(workdir):
        raise Her2jaxError("has no features/train.npz; fit it again with --mode=train",
                           file=str(workdir))
    config = workdir_lib.read(workdir)["config"]
    tests = [f"test_{c}" for c in config["data"]["test_centers"]]
    return {**found, **loop.extract_features(workdir, splits=["train", "val", *tests],
                                             which=which, data_dir=data_dir)}


def analyze(workdir, *, data_dir: str | None = None, which: str = "best", seed: int = 0,
            max_explained: int = 100, methods=embeddings.METHODS,
            progress: bool = True) -> dict:
    """Runs the analysis stage on a trained workdir; returns (and writes) summary.json.

    Args:
      workdir: a trained (or PCA+LR-fitted) workdir.
      data_dir: where the prepared dataset is now (for feature extraction).
      which: the checkpoint features come from, if they must be extracted.
      seed: for the embeddings and SHAP.
      max_explained: SHAP explains at most this many held-out cases (Kernel SHAP costs
        grow with it; the study explained its test sets).
      methods: embeddings to draw ('tsne', 'umap').
      progress: SHAP progress bar.
    """
    workdir = Path(workdir)
    record = workdir_lib.read(workdir)
    out = workdir / ANALYSIS_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = _feature_files(workdir, data_dir, which)
    summary = {"features": {name: str(path.relative_to(workdir)) for name, path in
                            paths.items()}}
    summary["embeddings"] = embeddings.analyze_embeddings(list(paths.values()), out,
                                                          seed=seed, methods=methods)

    train = embeddings.load_features([paths["train"]])
    held_out = [p for name, p in paths.items() if name != "train"]
    if not held_out:
        raise Her2jaxError("has features for the training split only; nothing to explain",
                           file=str(workdir))
    rows = embeddings.load_features(held_out)
    keep = np.random.default_rng(seed).permutation(len(rows["features"]))[:max_explained]
    explained = {"features": rows["features"][np.sort(keep)]}
    class_names = tuple(train["class_names"])
    components = int(record["config"]["train"].get("pca_components", 16))
    result = shap_features.explain(train, explained, class_names, n_components=components,
                                   seed=seed, progress=progress)
    written = shap_features.plot(result, out, class_names)
    summary["shap"] = {
        "protocol": "StandardScaler + PCA + LogisticRegression on the encoder features "
                    "(fitted on train), KernelExplainer on predict_proba",
        "explained_cases": int(len(keep)),
        "components": result["feature_names"],
        "explained_variance_ratio": [float(v) for v in result["explained_variance_ratio"]],
        "mean_abs": {k: [float(v) for v in vals] for k, vals in result["mean_abs"].items()},
        "files": [str(Path(p).relative_to(out)) for p in written],
    }
    files.write_metrics(out / SUMMARY_FILE, summary)
    return json.loads((out / SUMMARY_FILE).read_text())
