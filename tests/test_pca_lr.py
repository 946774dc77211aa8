"""The study's protocol (train.protocol='pca_lr'): frozen encoder features -> StandardScaler ->
PCA -> LogisticRegression, on the shared phantom dataset with tiny_cpu's tiny ViT at 24^3."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from her2jax.data import pipeline
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files
from her2jax.models import factory, port
from her2jax.train import pca_lr
from her2jax.train import workdir as workdir_lib

from .test_factory import load_config, torch_references
from .test_train import small_config

EVAL_SPLITS = ("val", "test_CENTER_C")
ALL_SPLITS = ("train", *EVAL_SPLITS)


def pca_config(data_dir, **train):
    config = small_config(data_dir)
    config.train.protocol = "pca_lr"
    config.train.pca_components = 4
    config.train.update(train)
    return config


def _probs(workdir, name) -> np.ndarray:
    frame = files.read_predictions(workdir / "eval" / name / "predictions.csv")
    return files.prediction_arrays(frame)[1]


def _npz(workdir, name) -> dict[str, np.ndarray]:
    with np.load(workdir / "features" / f"{name}.npz", allow_pickle=False) as npz:
        return dict(npz)


def _images(data_dir, config, name: str) -> np.ndarray:
    """[N, 24, 24, 24, 1] float32 volumes of a split, in split order."""
    dataset = pipeline.open_dataset(data_dir, config.data)
    split = pipeline.select_splits(dataset, config.data)[name]
    batch = next(pipeline.eval_batches(dataset, split, global_batch_size=len(split)))
    return batch["image"].astype(np.float32)


@pytest.fixture(scope="module")
def fitted(data_dir, tmp_path_factory):
    """A fit with a seed-initialised encoder, and what it wrote (before evaluate rewrites it)."""
    workdir = tmp_path_factory.mktemp("pca_lr")
    config = pca_config(data_dir)
    summaries = pca_lr.fit(config, workdir, n_boot=200)
    written = {name: dict(_npz(workdir, name), csv_probs=_probs(workdir, name)
                          if name != "train" else None) for name in ALL_SPLITS}
    return workdir, config, summaries, written


def test_fit_writes_eval_files_the_classifier_and_features(fitted):
    workdir, config, summaries, written = fitted
    assert set(summaries) == set(EVAL_SPLITS)
    assert pca_lr.is_pca_lr(workdir)
    assert not (workdir / "checkpoints").exists()   # no gradient training ran
    for name in EVAL_SPLITS:
        frame = files.read_predictions(workdir / "eval" / name / "predictions.csv")
        on_disk = files.read_metrics(workdir / "eval" / name / "metrics.json")
        assert {"n", "micro_auc", "macro_auc", "per_class_auc", "pairwise_auc",
                "confusion_matrix", "class_names"} <= set(on_disk)
        assert on_disk["protocol"] == "pca_lr" and on_disk["pca_components"] == 4
        assert len(frame) == on_disk["n"] == summaries[name]["n"] > 0
        assert "manufacturer" in frame.columns
        low, value, high = (on_disk["macro_auc"][k] for k in ("ci_low", "value", "ci_high"))
        assert 0 <= low <= value <= high <= 1
        np.testing.assert_allclose(written[name]["csv_probs"].sum(1), 1.0, atol=1e-12)
        np.testing.assert_array_equal(written[name]["csv_probs"], written[name]["probs"])
    test_frame = files.read_predictions(workdir / "eval" / "test_CENTER_C" / "predictions.csv")
    assert set(test_frame["center"]) == {"CENTER_C"}

    classifier = pca_lr.PcaLr.load(workdir / "pca_lr.npz")
    assert classifier.classes.tolist() == [0, 1, 2]
    assert classifier.pca_components.shape == (4, 48) and classifier.coef.shape == (3, 4)
    assert classifier.encoder.startswith("random init")
    assert classifier.n_train == len(written["train"]["labels"])
    for name in ALL_SPLITS:
        npz = written[name]
        n = len(npz["labels"])
        assert npz["features"].shape == (n, 48) and npz["pca_features"].shape == (n, 4)
        assert npz["probs"].shape == (n, 3)
    # The training features are standardised and decorrelated by the saved transform.
    scores = classifier.transform(written["train"]["features"])
    np.testing.assert_allclose(scores.mean(0), 0.0, atol=1e-9)
    covariance = np.cov(scores, rowvar=False)
    np.testing.assert_allclose(covariance - np.diag(np.diag(covariance)), 0.0, atol=1e-9)


def test_numpy_probabilities_equal_sklearns(fitted):
    workdir, config, _, written = fitted
    train = written["train"]
    refit = pca_lr.make_sklearn(4, seed=config.train.seed, balanced=True)
    refit.fit(train["features"].astype(np.float64), train["labels"])
    classifier = pca_lr.PcaLr.load(workdir / "pca_lr.npz")
    np.testing.assert_allclose(classifier.pca_components, refit[1].components_, atol=1e-12)
    np.testing.assert_allclose(classifier.coef, refit[2].coef_, atol=1e-12)
    for name in ALL_SPLITS:
        features = written[name]["features"].astype(np.float64)
        expected = refit.predict_proba(features)
        np.testing.assert_allclose(classifier.predict_proba(features), expected, rtol=0,
                                   atol=1e-9)
        np.testing.assert_allclose(written[name]["probs"], expected, rtol=0, atol=1e-9)
        np.testing.assert_allclose(written[name]["pca_features"], refit[:2].transform(features),
                                   rtol=0, atol=1e-9)


@pytest.mark.parametrize("classes", [(0, 1, 2), (0, 1), (0, 2)])
def test_numpy_transform_matches_sklearn_for_any_set_of_classes(classes, tmp_path):
    rng = np.random.default_rng(len(classes))
    scale = rng.uniform(0.1, 5.0, 10)
    x = rng.standard_normal((60, 10)) * scale + 3.0
    y = rng.permutation(np.resize(np.asarray(classes), 60))
    fitted = pca_lr.make_sklearn(4, seed=0, balanced=True).fit(x, y)
    classifier = pca_lr.PcaLr.from_sklearn(fitted, ("zero", "low", "positive"),
                                           encoder="test", n_train=60)
    classifier.save(tmp_path / "pca_lr.npz")
    loaded = pca_lr.PcaLr.load(tmp_path / "pca_lr.npz")
    x_new = rng.standard_normal((25, 10)) * scale + 3.0
    probs = loaded.predict_proba(x_new)
    np.testing.assert_allclose(probs[:, fitted.classes_], fitted.predict_proba(x_new), rtol=0,
                               atol=1e-9)
    absent = sorted(set(range(3)) - set(classes))
    assert not probs[:, absent].any()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    assert loaded.class_names == ("zero", "low", "positive") and loaded.encoder == "test"


def test_evaluate_reproduces_fit(fitted):
    workdir, _, summaries, written = fitted
    again = pca_lr.evaluate(workdir, n_boot=200)
    assert set(again) == set(summaries)
    for name in EVAL_SPLITS:
        np.testing.assert_allclose(_probs(workdir, name), written[name]["csv_probs"], rtol=0,
                                   atol=1e-9)
        # Same encoder, same program: the same features to the bit.
        np.testing.assert_array_equal(_npz(workdir, name)["features"], written[name]["features"])
        for key in ("macro_auc", "micro_auc", "per_class_auc", "confusion_matrix", "n"):
            assert again[name][key] == summaries[name][key], key


def test_no_gradient_step_the_features_are_the_built_encoders(fitted, data_dir):
    workdir, config, _, written = fitted
    fresh = factory.build_model(config)
    restored = pca_lr.load(workdir)
    model = nnx.merge(restored.graphdef, restored.weights.params, restored.weights.rest)
    saved_leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model.encoder)))
    fresh_leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(fresh.encoder)))
    assert len(saved_leaves) == len(fresh_leaves) > 10
    for saved, built in zip(saved_leaves, fresh_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(built))
    fresh.eval()
    features = fresh.features(jnp.asarray(_images(data_dir, config, "val")))
    np.testing.assert_allclose(np.asarray(features), written["val"]["features"], rtol=0,
                               atol=1e-5 * np.abs(written["val"]["features"]).max())


def test_a_pretrained_port_gives_the_torch_references_features(data_dir, tmp_path):
    ref = torch_references()
    torch = ref.torch
    torch.manual_seed(0)
    reference = ref.TorchViT3D(in_chans=1, img=24, patch=8, dim=48, depth=2, heads=2).eval()
    port.port("fmbcmri", ref.save_fmbcmri(reference, tmp_path / "ckpt.pth"), tmp_path / "port",
              num_heads=2)
    config = pca_config(data_dir)
    config.model.pretrained = str(tmp_path / "port")
    workdir = tmp_path / "run"
    summaries = pca_lr.fit(config, workdir, n_boot=0)
    assert summaries["test_CENTER_C"]["macro_auc"]["ci_low"] is None or np.isnan(
        summaries["test_CENTER_C"]["macro_auc"]["ci_low"])
    assert pca_lr.PcaLr.load(workdir / "pca_lr.npz").encoder == str(tmp_path / "port")
    saved = _npz(workdir, "test_CENTER_C")["features"]
    image = _images(data_dir, config, "test_CENTER_C")[:1]
    with torch.no_grad():
        expected = reference(ref.to_torch(image)).numpy()
    ref.assert_parity(saved[:1], expected)
    # The workdir holds its encoder: evaluation no longer needs the port.
    shutil.rmtree(tmp_path / "port")
    pca_lr.evaluate(workdir, splits=["test_CENTER_C"], n_boot=0)
    np.testing.assert_allclose(_npz(workdir, "test_CENTER_C")["features"], saved, rtol=0,
                               atol=1e-6)


def test_binary_scheme_and_more_components_than_examples(data_dir, tmp_path):
    config = pca_config(data_dir, pca_components=1000, class_weighting="none")
    config.data.scheme = "her2_binary"
    summaries = pca_lr.fit(config, tmp_path / "run", n_boot=0)
    classifier = pca_lr.PcaLr.load(tmp_path / "run" / "pca_lr.npz")
    n_train = classifier.n_train
    assert classifier.n_components == min(n_train, 48) and classifier.coef.shape[0] == 1
    assert list(summaries["val"]["class_names"]) == ["HER2-negative", "HER2-positive"]
    probs = _probs(tmp_path / "run", "test_CENTER_C")
    assert probs.shape[1] == 2
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    # Fitting the same workdir again replaces its encoder and classifier with equal ones.
    pca_lr.fit(config, tmp_path / "run", n_boot=0)
    np.testing.assert_array_equal(_probs(tmp_path / "run", "test_CENTER_C"), probs)


def test_bad_settings_fail_before_the_workdir_is_touched(data_dir, tmp_path):
    for key, value in [("pca_components", 0), ("protocol", "gradient"),
                       ("class_weighting", "inverse")]:
        with pytest.raises(Her2jaxError, match=f"train.{key}"):
            pca_lr.fit(pca_config(data_dir, **{key: value}), tmp_path / key)
        assert not (tmp_path / key).exists()
    config = pca_config(data_dir)
    config.model.encoder = "none"
    with pytest.raises(Her2jaxError, match="model.encoder"):
        pca_lr.fit(config, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_only_pca_lr_workdirs_are_evaluated_here(data_dir, tmp_path):
    assert not pca_lr.is_pca_lr(tmp_path / "nothing")
    workdir_lib.claim(tmp_path / "gradient", small_config(data_dir), {})
    assert not pca_lr.is_pca_lr(tmp_path / "gradient")
    with pytest.raises(Her2jaxError, match="not a pca_lr workdir"):
        pca_lr.evaluate(tmp_path / "gradient")
    workdir_lib.claim(tmp_path / "unfitted", pca_config(data_dir), {})
    with pytest.raises(Her2jaxError, match="run --mode=train first"):
        pca_lr.evaluate(tmp_path / "unfitted")


def test_the_study_config_describes_the_frozen_vit_b():
    config = load_config("fmbcmri_pca_lr")
    assert config.train.protocol == "pca_lr" and config.train.pca_components == 16
    assert tuple(config.data.recipe.shape) == (48, 48, 48) and config.model.vit.size == "base"
    assert config.model.pretrained == ""
    model = nnx.eval_shape(lambda: factory.build_model(config))
    features = nnx.eval_shape(lambda m: m.features(jnp.zeros((2, 48, 48, 48, 1))), model)
    assert features.shape == (2, 768)


def test_pca_lr_opens_its_run_as_the_training_loop_does(data_dir, tmp_path, monkeypatch):
    """One opening for every mode that fits on a workdir (issue 17): pca_lr.fit goes through
    loop.open_run (settings, mesh, dataset, splits) like loop.train, and fits on its splits."""
    from her2jax.train import loop, pca_lr

    opened = []
    real = loop.open_run

    def recording(config):
        run = real(config)
        opened.append(run)
        return run

    monkeypatch.setattr(loop, "open_run", recording)
    pca_lr.fit(pca_config(data_dir), tmp_path / "run", n_boot=0)
    assert len(opened) == 1 and set(opened[0].splits) >= {"train", "val"}
    trained_on = json.loads((tmp_path / "run" / "trained_on.json").read_text())
    assert trained_on["train"] == sorted(opened[0].splits["train"].patient_ids)


@pytest.fixture(scope="module")
def kinetic_dir(phantom_cohort, tmp_path_factory):
    """The shared phantom prepared with the demo's kind of recipe (PE, PEL, MASK), small."""
    from her2jax.data import prepare, recipes

    config = recipes.data_config("kinetic_mm")
    config.recipe.update(shape=(16, 16, 16), spacing_mm=4.0)
    config.update(test_centers=("CENTER_C",), worker_count=0)
    out = tmp_path_factory.mktemp("kinetic")
    prepare.prepare(phantom_cohort, out, config, workers=1, progress=False)
    return out, config


@pytest.mark.parametrize("encoder", ["none", "vit3d"])
def test_the_tumour_region_network_is_frozen_saved_and_restored(kinetic_dir, tmp_path, encoder):
    """pca_lr on the tumour-region network's features, alone (encoder 'none') or beside a ViT:
    the workdir keeps the branch's state (roi/) beside the encoder's, so evaluate reproduces
    the fit to the bit (before, the branch alone was refused and beside a ViT it was not
    saved, and the workdir could not be evaluated)."""
    data_dir, data = kinetic_dir
    config = pca_config(data_dir)
    config.data = data
    config.data.data_dir = str(data_dir)
    config.model.encoder = encoder
    config.model.roi_pool.update(hidden=4, rim_voxels=(1, 2))
    workdir = tmp_path / "run"
    summaries = pca_lr.fit(config, workdir, n_boot=50)
    written = _npz(workdir, "test_CENTER_C")["features"]
    assert written.shape[1] == (18 if encoder == "none" else 18 + 48)
    assert (workdir / pca_lr.ROI_DIR).is_dir()
    assert (workdir / pca_lr.ENCODER_DIR).is_dir() == (encoder != "none")
    again = pca_lr.evaluate(workdir, n_boot=50)
    np.testing.assert_array_equal(_npz(workdir, "test_CENTER_C")["features"], written)
    assert again["test_CENTER_C"]["macro_auc"] == summaries["test_CENTER_C"]["macro_auc"]


def _probe_features_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_features.py"
    spec = importlib.util.spec_from_file_location("probe_features", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::UserWarning")     # 5 folds of a few cases: NaN scores
def test_probe_features_refits_the_protocol_of_a_workdir_and_its_baseline(fitted):
    """benchmarks/probe_features.py on a real pca_lr workdir: its refit of the protocol gives
    the AUC the workdir reported, and every figure exists and is in range."""
    from her2jax.data import kinetic_features

    workdir, config, summaries, _ = fitted
    probe = _probe_features_module().probe_workdir(workdir, n_components=4)
    assert probe["held_out"] == "CENTER_C"
    assert probe["n_components"] == 4
    assert probe["pca_lr"] == pytest.approx(summaries["test_CENTER_C"]["macro_auc"]["value"],
                                            abs=1e-4)
    names = kinetic_features.FEATURES
    for key in ("encoded", "pca_lr_plus", "baseline_without"):
        assert set(probe[key]) == set(names)
        assert all(np.isfinite(v) for v in probe[key].values())
    assert 0.0 <= probe["baseline"] <= 1.0
    tuned = probe["tuned"]
    assert 0.0 <= tuned["lr_all"] <= 1.0 and 0.0 <= tuned["pca"] <= 1.0
    assert tuned["pca_k"] in (2, 4, 8, 16, 32) and tuned["lr_all_c"] > 0


def test_probe_features_r2_sees_a_feature_that_is_encoded_and_not_one_that_is_not():
    rng = np.random.default_rng(0)
    target = rng.normal(size=120)
    unrelated = rng.normal(size=120)
    features = np.c_[rng.normal(size=(120, 10)), 2.0 * target + 1.0 + 0.05 * rng.normal(size=120)]
    encoded = _probe_features_module().encoded
    assert encoded(features[:80], target[:80], features[80:], target[80:]) > 0.95
    assert encoded(features[:80], unrelated[:80], features[80:], unrelated[80:]) < 0.2


def test_probe_features_tuned_readouts_find_the_signal_among_noise_features():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 60)
    signal = labels + 0.5 * rng.normal(size=labels.size)
    features = np.c_[rng.normal(size=(labels.size, 40)), signal]
    order = rng.permutation(labels.size)
    features, labels = features[order], labels[order]
    tuned = _probe_features_module().tuned_readouts(
        features[:120], labels[:120], features[120:], labels[120:], ["a", "b", "c"])
    assert tuned["lr_all"] > 0.75           # chance: 0.5
    # PCA's components are the noise's largest directions: too few of them miss the signal.
    assert tuned["pca_k"] >= 16 and tuned["pca"] > 0.7
