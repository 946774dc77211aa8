"""The study's protocol: frozen encoder features -> StandardScaler -> PCA -> LogisticRegression.

No gradient step is taken. The encoder the config describes (with ``config.model.pretrained``
the frozen foundation encoder; without, a seeded random initialisation, allowed but only a
baseline) encodes every example once; a scikit-learn
``make_pipeline(StandardScaler(), PCA(k), LogisticRegression())`` is fitted on the training
split's features, with ``k = min(train.pca_components, n_train, n_features)`` (the study: 16);
the logistic regression is multinomial for three classes (scikit-learn's default for lbfgs)
and ``class_weight='balanced'`` when ``train.class_weighting`` is.

What the workdir holds (``config.json`` says ``train.protocol == 'pca_lr'``):

* ``encoder/``: orbax checkpoint (``StandardCheckpointer``) of the encoder's state as a pure
  dict, the layout ``her2jax-port`` writes. The workdir is self-contained: evaluation rebuilds
  the encoder from it (shapes from the config, values from here) and never needs the
  pretrained port again, which may since have moved.
* ``roi/``: likewise, the tumour-region network's state when the model has one (beside the
  encoder, or alone with ``model.encoder='none'``, whose features it then makes alone).
* ``pca_lr.npz``: the fitted classifier as plain arrays (see :class:`PcaLr`); read with
  ``allow_pickle=False``, because loading a pickle can run code. Probabilities are computed
  from these arrays in numpy, equal to scikit-learn's ``predict_proba`` to ~1e-15.
* ``eval/<split>/predictions.csv`` and ``metrics.json`` for val and every test centre, as
  ``inference.evaluate`` writes them; ``features/<split>.npz`` (train, val, tests) with
  ``inference.extract_features``' keys plus ``pca_features`` [N, k], the logistic regression's
  inputs (what a SHAP KernelExplainer on the k components explains).

  her2jax --config=configs/fmbcmri_pca_lr.py --workdir=DIR --config.model.pretrained=PORT
  her2jax --workdir=DIR --mode=eval
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from her2jax.data import pipeline
from her2jax.errors import Her2jaxError
from her2jax.evaluate import metrics
from her2jax.models import factory
from her2jax.train import inference, loop
from her2jax.train import state as state_lib
from her2jax.train import step as step_lib
from her2jax.train import workdir as workdir_lib

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

PROTOCOL = "pca_lr"
MODEL_FILE = "pca_lr.npz"
ENCODER_DIR = "encoder"
ROI_DIR = "roi"
# The Classifier's parts that make the features, and where a workdir keeps each.
FROZEN_PARTS = {"encoder": ENCODER_DIR, "roi": ROI_DIR}
# The logistic regression's settings: scikit-learn's defaults (L2, C = 1, lbfgs) with room to
# converge on standardised, decorrelated inputs.
LR_C = 1.0
LR_MAX_ITER = 5000


# ---------------------------------------------------------------- the classifier as arrays


@dataclasses.dataclass(frozen=True)
class PcaLr:
    """A fitted StandardScaler -> PCA -> LogisticRegression, as numpy arrays (float64).

    Attributes:
      scaler_mean, scaler_scale: [F] StandardScaler ``mean_``, ``scale_``.
      pca_mean: [F] PCA ``mean_`` (of the standardised training features).
      pca_components: [k, F] PCA ``components_``.
      explained_variance_ratio: [k].
      coef: [K', k] LogisticRegression ``coef_`` ([1, k] when it saw two classes).
      intercept: [K'] (or [1]).
      classes: [K'] int task-class indices the regression saw (``classes_``), increasing.
      class_names: the scheme's K class names (probability columns).
      encoder: where the encoder came from (the pretrained port, or a random init).
      n_train: training examples.
    """

    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    pca_mean: np.ndarray
    pca_components: np.ndarray
    explained_variance_ratio: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    class_names: tuple[str, ...]
    encoder: str
    n_train: int

    @property
    def n_components(self) -> int:
        return int(self.pca_components.shape[0])

    def transform(self, features: np.ndarray) -> np.ndarray:
        """[N, F] encoder features -> [N, k] float64 PCA scores (scikit-learn's order of
        operations)."""
        x = (np.asarray(features, np.float64) - self.scaler_mean) / self.scaler_scale
        return x @ self.pca_components.T - self.pca_mean @ self.pca_components.T

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """[N, F] encoder features -> [N, K] float64 class probabilities.

        Softmax over the decision values for three or more classes (multinomial), the
        logistic sigmoid for two. A class the regression never saw gets probability 0.
        """
        decision = self.transform(features) @ self.coef.T + self.intercept
        if len(self.classes) <= 2:
            positive = 1.0 / (1.0 + np.exp(-decision[:, 0]))
            seen = np.stack([1.0 - positive, positive], axis=1)
        else:
            decision = decision - decision.max(axis=1, keepdims=True)
            seen = np.exp(decision)
            seen /= seen.sum(axis=1, keepdims=True)
        probs = np.zeros((len(seen), len(self.class_names)), np.float64)
        probs[:, self.classes] = seen
        return probs

    @classmethod
    def from_sklearn(cls, fitted: Pipeline, class_names: Sequence[str], *, encoder: str,
                     n_train: int) -> PcaLr:
        """The arrays of a fitted ``make_sklearn`` pipeline."""
        scaler, pca, lr = fitted[0], fitted[1], fitted[2]
        as64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
        return cls(scaler_mean=as64(scaler.mean_), scaler_scale=as64(scaler.scale_),
                   pca_mean=as64(pca.mean_), pca_components=as64(pca.components_),
                   explained_variance_ratio=as64(pca.explained_variance_ratio_),
                   coef=as64(lr.coef_), intercept=as64(lr.intercept_),
                   classes=np.asarray(lr.classes_, np.int64),
                   class_names=tuple(str(c) for c in class_names), encoder=encoder,
                   n_train=int(n_train))

    def save(self, path) -> None:
        """Writes the arrays to ``path`` (.npz, no pickled objects), atomically."""
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}
        inference.atomic_savez(Path(path), arrays)

    @classmethod
    def load(cls, path) -> PcaLr:
        """Reads ``save``'s file (never unpickles)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                values = {f.name: npz[f.name] for f in dataclasses.fields(cls)}
        except FileNotFoundError:
            raise Her2jaxError("holds no fitted PCA + logistic regression; run --mode=train "
                               "first", file=str(path)) from None
        except (OSError, ValueError, KeyError) as e:
            raise Her2jaxError(f"unreadable fitted classifier ({e})", file=str(path)) from None
        values["class_names"] = tuple(str(c) for c in values["class_names"])
        values["encoder"] = str(values["encoder"])
        values["n_train"] = int(values["n_train"])
        return cls(**values)


def make_sklearn(n_components: int, *, seed: int, balanced: bool) -> Pipeline:
    """The unfitted scikit-learn pipeline the protocol fits (multinomial for K >= 3)."""
    # scikit-learn loads here, not with the module: every `her2jax` command imports this
    # module (for `is_pca_lr`), and scikit-learn's import is ~0.7 s of its start-up.
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(),
        PCA(n_components=n_components, random_state=seed),
        LogisticRegression(C=LR_C, max_iter=LR_MAX_ITER, random_state=seed,
                           class_weight="balanced" if balanced else None))


# ---------------------------------------------------------------- fit


@dataclasses.dataclass(frozen=True)
class _Weights:
    """What ``inference.predict_split`` reads from a state: ``params`` and ``rest``."""

    params: nnx.State
    rest: nnx.State


def _check_settings(config) -> None:
    """The protocol's own settings; every range (pca_components, class_weighting, ...) is
    checked by ``loop.open_run``, before anything is written."""
    if config.train.protocol != PROTOCOL:
        raise Her2jaxError(f"is {config.train.protocol!r}; pca_lr.fit runs the {PROTOCOL!r} "
                           "protocol", key="train.protocol")


def _encoder_source(config) -> str:
    if config.model.pretrained:
        return str(Path(config.model.pretrained).absolute())
    return f"random init (model.seed={config.model.seed})"


def fit(config: ml_collections.ConfigDict, workdir, *, force: bool = False,
        n_boot: int = 2000, progress: bool = False) -> dict[str, dict]:
    """Fits the protocol in ``workdir`` and evaluates it on val and every test centre.

    Args:
      config: the full config, ``train.protocol == 'pca_lr'``.
      workdir: the run's directory.
      force: accept a config / dataset change against the workdir's config.json.
      n_boot: bootstrap resamples for the metrics' confidence intervals.

    Returns:
      ``{split: metrics summary}`` for val and every test split (as metrics.json).
    """
    workdir = Path(workdir).absolute()
    _check_settings(config)

    # 1. Settings, mesh and data, as the training loop opens them (the splits are chosen
    # now, from the config).
    run = loop.open_run(config)
    mesh, dataset, splits = run.mesh, run.dataset, run.splits
    train_split = splits["train"]
    if len(np.unique(train_split.labels)) < 2:
        raise Her2jaxError("the training split holds fewer than two classes "
                           f"({train_split.class_counts()}); a classifier needs two",
                           key="data.train_centers")

    # 2. The frozen encoder (a bad model setting fails here, before the workdir is touched).
    if not config.model.pretrained:
        logging.warning("no model.pretrained: the features come from a randomly initialised "
                        "encoder (model.seed=%d), a baseline, not the study's protocol",
                        config.model.seed)
    model = factory.build_model(config)
    frozen = {part: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(getattr(model, part))))
              for part in FROZEN_PARTS if getattr(model, part) is not None}
    graphdef, params, rest = state_lib.split_model(model)
    del model
    weights = _replicated(params, rest, mesh)

    # 3. The workdir belongs to this run (no second fit or training into it) and to this
    # config and dataset.
    with workdir_lib.locked(workdir):
        workdir_lib.claim(workdir, config, dataset.meta, force=force)
        workdir_lib.record_trained_on(workdir, train_split.patient_ids,
                                      splits["val"].patient_ids if "val" in splits else ())
        return _fit_claimed(config, workdir, dataset, splits, train_split, graphdef, weights,
                            frozen, mesh, n_boot=n_boot, progress=progress)


def _fit_claimed(config, workdir: Path, dataset, splits, train_split, graphdef, weights,
                 frozen: dict, mesh, *, n_boot: int, progress: bool) -> dict[str, dict]:
    """Steps 4-7 of :func:`fit`, with the workdir held."""
    tc = config.train
    # 4. Features of every split, once.
    predict = step_lib.make_predict(graphdef)
    features = {name: inference.predict_split(predict, weights, dataset, split, mesh,
                                         inference.eval_batch_size(config))[1]
                for name, split in splits.items() if len(split)}

    # 5. StandardScaler -> PCA -> LogisticRegression on the training features.
    x = features["train"].astype(np.float64)
    k = min(int(tc.pca_components), *x.shape)
    fitted = make_sklearn(k, seed=tc.seed, balanced=tc.class_weighting == "balanced")
    fitted.fit(x, train_split.labels)
    classifier = PcaLr.from_sklearn(fitted, train_split.class_names,
                                    encoder=_encoder_source(config), n_train=len(train_split))
    logging.info("PCA %d of %d features keeps %.1f%% of the variance", k, x.shape[1],
                 100 * classifier.explained_variance_ratio.sum())

    # 6. Save: the networks that made the features, and the classifier's arrays.
    for part, state in frozen.items():
        _save_encoder(workdir / FROZEN_PARTS[part], state)
    if jax.process_index() == 0:
        classifier.save(workdir / MODEL_FILE)

    # 7. Evaluation files and features.
    return _write_outputs(workdir, config, dataset, splits, features, classifier,
                          n_boot=n_boot, progress=progress)


def _replicated(params, rest, mesh) -> _Weights:
    replicated = NamedSharding(mesh, P())
    return _Weights(jax.device_put(params, replicated), jax.device_put(rest, replicated))


def _save_encoder(path: Path, pure: dict) -> None:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, pure, force=True)   # force: a refit replaces the old encoder
    checkpointer.wait_until_finished()


def _write_outputs(workdir: Path, config, dataset: pipeline.Dataset,
                   splits: dict[str, pipeline.Split], features: dict[str, np.ndarray],
                   classifier: PcaLr, *, n_boot: int, progress: bool = False) -> dict[str, dict]:
    """``features/<split>.npz`` for every split with features, ``eval/<split>/`` for every
    split but train. Returns the eval summaries."""
    outputs = {}
    for name, split in splits.items():
        if name not in features:
            logging.warning("split %s is empty: nothing to write", name)
            continue
        probs = classifier.predict_proba(features[name])
        if jax.process_index() == 0:
            inference.atomic_savez(workdir / "features" / f"{name}.npz", dict(
                features=features[name], probs=probs, labels=split.labels,
                patient_ids=np.asarray(split.patient_ids), centers=np.asarray(split.centers),
                class_names=np.asarray(split.class_names),
                pca_features=classifier.transform(features[name])))
        if name == "train":
            continue
        summary = metrics.summarize(split.labels, probs, split.class_names, n_boot=n_boot,
                                    progress=name if progress else None)
        summary.update(step=0, checkpoint=MODEL_FILE, protocol=PROTOCOL,
                       pca_components=classifier.n_components, encoder=classifier.encoder)
        outputs[name] = (split, probs, summary)
    inference.write_eval(workdir, dataset, config, outputs, n_boot=n_boot)
    return {name: summary for name, (_, _, summary) in outputs.items()}


# ---------------------------------------------------------------- a fitted workdir


def is_pca_lr(workdir) -> bool:
    """Whether ``workdir``'s config.json says ``train.protocol == 'pca_lr'`` (False when the
    workdir has no config.json)."""
    if not (Path(workdir) / workdir_lib.CONFIG_FILE).exists():
        return False
    config = workdir_lib.read(Path(workdir)).get("config", {})
    return config.get("train", {}).get("protocol", "gradient") == PROTOCOL


@dataclasses.dataclass
class Fitted:
    """A pca_lr workdir, restored: the encoder (``make_predict``'s inputs) and the classifier.

    ``predict(weights.params, weights.rest, image)`` returns (ignored head probs, features
    [B, F]); ``classifier.predict_proba(features)`` the class probabilities.
    """

    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef
    weights: _Weights
    classifier: PcaLr
    mesh: jax.sharding.Mesh

    def predict_fn(self, views=((),)):
        return step_lib.make_predict(self.graphdef, views)


def load(workdir, *, data_dir: str | None = None) -> Fitted:
    """Restores a pca_lr workdir into the current mesh (the pretrained port is not needed).

    Args:
      workdir: a workdir ``fit`` wrote.
      data_dir: where the prepared dataset is now (default: the config's).
    """
    workdir = Path(workdir).absolute()
    if not is_pca_lr(workdir):
        raise Her2jaxError(f"is not a {PROTOCOL} workdir (its config.json does not say "
                           f"train.protocol={PROTOCOL!r})", file=str(workdir))
    config = ml_collections.ConfigDict(workdir_lib.read(workdir)["config"])
    config.model.pretrained = ""   # the workdir holds the encoder
    if data_dir:
        config.data.data_dir = data_dir
    classifier = PcaLr.load(workdir / MODEL_FILE)
    model = nnx.eval_shape(lambda: factory.build_model(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    for part, folder in FROZEN_PARTS.items():
        if part in pure:
            pure[part] = _restore_encoder(workdir / folder, pure[part])
    # The head is unused (the classifier replaces it) but make_predict's program needs values.
    pure["head"] = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), pure["head"])
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    graphdef, params, rest = state_lib.split_model(model)
    mesh = step_lib.make_mesh()
    return Fitted(config, graphdef, _replicated(params, rest, mesh), classifier, mesh)


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in leaves}


def _restore_encoder(path: Path, abstract: dict) -> dict:
    import orbax.checkpoint as ocp

    if not path.is_dir():
        raise Her2jaxError("holds no encoder state; run --mode=train first", file=str(path))
    checkpointer = ocp.StandardCheckpointer()
    stored, wanted = _shapes(checkpointer.metadata(path).item_metadata), _shapes(abstract)
    for name in sorted(set(stored) | set(wanted)):
        if stored.get(name) != wanted.get(name):
            raise Her2jaxError(f"the saved encoder does not fit the config's: {name} is "
                               f"{stored.get(name, 'absent')} saved and "
                               f"{wanted.get(name, 'absent')} in the config", file=str(path))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    return checkpointer.restore(path, target)


def evaluate(workdir, *, splits: Sequence[str] = (), data_dir: str | None = None,
             n_boot: int = 2000, progress: bool = False, tta: bool = False) -> dict[str, dict]:
    """Recomputes features with the saved encoder and writes ``eval/<split>/`` (and
    ``features/<split>.npz``) for the named splits (default: val and every test centre);
    the results equal ``fit``'s (with ``tta``: features averaged over the flips of
    ``step.tta_views``).

    Returns:
      ``{split: metrics summary}`` (train, when named, gets features but no eval files).
    """
    workdir = Path(workdir).absolute()
    fitted = load(workdir, data_dir=data_dir)
    config = fitted.config
    dataset = pipeline.open_dataset(config.data.data_dir, config.data)
    named = inference.eval_splits(dataset, config.data, splits)
    for name, split in named.items():
        workdir_lib.check_no_leak(workdir, name, split.patient_ids)
    predict = fitted.predict_fn(inference.tta_views(config, tta))
    features = {name: inference.predict_split(predict, fitted.weights, dataset, split, fitted.mesh,
                                         inference.eval_batch_size(config))[1]
                for name, split in named.items() if len(split)}
    return _write_outputs(workdir, config, dataset, named, features, fitted.classifier,
                          n_boot=n_boot, progress=progress)
