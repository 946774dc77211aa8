"""The analysis stage (``her2jax --mode=analyze``): embeddings and the study's SHAP.

From a trained workdir's ``features/<split>.npz`` (written first when missing):

* t-SNE and UMAP of the encoder features, coloured by class and by centre, with silhouette
  scores and the domain-shift warning (:mod:`embeddings`);
* feature-space SHAP as in the study: PCA + logistic regression fitted on the training
  features, KernelExplainer on the held-out cases (:mod:`shap_features`);
* image-space SHAP of a few cases per class (:mod:`image_shap`): NIfTI heatmaps on the crop and
  on the patient's original grid, and PNG montages, in ``analysis/shap/``;
* ``analysis/summary.json`` tying it together;
* ``report.html`` (:mod:`report`) when the workdir has been evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging

from her2jax.analysis import embeddings, image_shap, report, shap_features
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files
from her2jax.train import inference, pca_lr
from her2jax.train import workdir as workdir_lib

ANALYSIS_DIR = "analysis"
SUMMARY_FILE = "summary.json"
IMAGE_SHAP_DIR = "shap"


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
    return {**found, **inference.extract_features(workdir, splits=["train", "val", *tests],
                                             which=which, data_dir=data_dir)}


def analyze(workdir, *, data_dir: str | None = None, which: str = "best", seed: int = 0,
            max_explained: int = 100, methods=embeddings.METHODS, progress: bool = True,
            image_patients: Sequence[str] = (), image_per_class: int = 1,
            write_report: bool = True) -> dict:
    """Runs the analysis stage on a trained workdir; returns (and writes) summary.json.

    Args:
      workdir: a trained (or PCA+LR-fitted) workdir.
      data_dir: where the prepared dataset is now (for feature extraction).
      which: the checkpoint features come from, if they must be extracted.
      seed: for the embeddings and SHAP.
      max_explained: SHAP explains at most this many held-out cases (Kernel SHAP costs
        grow with it; the study explained its test sets).
      methods: embeddings to draw ('tsne', 'umap').
      progress: SHAP progress bars.
      image_patients: image-space SHAP for these patients instead of the top-confident ones.
      image_per_class: image-space SHAP for this many top-confident cases per class of the
        test centres (0: none).
      write_report: write ``report.html`` afterwards (when the workdir has been evaluated).
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
    summary["image_shap"], summary["image_shap_note"] = _image_shap(
        workdir, out, data_dir=data_dir, which=which, seed=seed, progress=progress,
        patients=image_patients, per_class=image_per_class)
    files.write_metrics(out / SUMMARY_FILE, summary)
    if write_report:
        if (workdir / "eval").is_dir():
            report.write_report(workdir, data_dir=data_dir)
            summary["report"] = report.REPORT_FILE
        else:
            summary["report"] = None
            logging.warning("no report.html: %s has no eval/ yet (run --mode=eval, then "
                            "her2jax-report)", workdir)
        files.write_metrics(out / SUMMARY_FILE, summary)
    return json.loads((out / SUMMARY_FILE).read_text())


def _image_shap(workdir: Path, out: Path, *, data_dir, which, seed, progress, patients,
                per_class) -> tuple[dict | None, str | None]:
    """(image-space SHAP summary or None, why it was not run or None)."""
    if pca_lr.is_pca_lr(workdir):
        return None, ("not run: a PCA + logistic-regression workdir has no end-to-end image "
                      "model to explain")
    if not patients and per_class < 1:
        return None, "not run: no cases asked for"
    return image_shap.explain_workdir(workdir, out / IMAGE_SHAP_DIR, patients=patients,
                                      per_class=per_class, which=which, data_dir=data_dir,
                                      seed=seed, progress=progress), None
