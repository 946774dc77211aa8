"""MoCo v3 pretraining (``--mode=pretrain``): the loss against a NumPy reference, the gathered
keys on 1 and 8 devices, the momentum update, the views, exact resume after SIGKILL, the
encoder exported as a port, unlabelled cohorts."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from her2jax.data import pipeline
from her2jax.errors import Her2jaxError
from her2jax.models import moco
from her2jax.train import checkpoint, defaults, pretrain
from her2jax.train import step as step_lib

from .conftest import kill_at_first_checkpoint, run_her2jax
from .test_factory import load_config

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_ARGS = ("--config=configs/pretrain_tiny.py", "--config.train.steps=30",
                 "--config.train.warmup_steps=3", "--config.train.save_every=10",
                 "--config.train.eval_every=15", "--config.train.log_every=5",
                 "--config.data.test_centers=('CENTER_C',)", "--noprogress")


def _config(shape=(16, 16, 16)):
    config = load_config("pretrain_tiny")
    config.data.recipe.shape = shape
    config.pretrain.update(dim=16, mlp_dim=32)
    config.train.update(steps=10, warmup_steps=2)
    return config


def _mesh(n: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]), (step_lib.AXIS,),
                axis_types=(jax.sharding.AxisType.Auto,))


def _setup(config, mesh):
    query = pretrain.build_query(config, bn_axis_name=step_lib.AXIS)
    optimizer = pretrain.make_optimizer(config, nnx.state(query, nnx.Param),
                                        total_steps=config.train.steps)
    graphdef, state = pretrain.create_state(query, optimizer, 0)
    step = pretrain.make_pretrain_step(
        graphdef, optimizer, mesh, views=pretrain.Views(), temperature=0.2,
        base_momentum=0.99, total_steps=config.train.steps)
    return graphdef, state, step


def _batch(mesh, n=16, shape=(16, 16, 16)):
    image = np.random.default_rng(0).normal(size=(n, *shape, 1)).astype(np.float32)
    sharding = NamedSharding(mesh, P(step_lib.AXIS))
    return {"image": jax.device_put(image, sharding),
            "index": jax.device_put(np.arange(n, dtype=np.int32), sharding)}


# ---------------------------------------------------------------- the loss


def _numpy_ctr(q: np.ndarray, k: np.ndarray, temperature: float) -> float:
    """MoCo v3's ``contrastive_loss`` (moco/builder.py) in NumPy on the whole batch:
    normalise, logits q k^T / T, cross-entropy against the diagonal (mean), times 2T."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = q @ k.T / temperature
    log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    return float(-np.mean(np.diag(log_p)) * 2 * temperature)


@pytest.mark.parametrize("devices", [1, 8])
def test_the_loss_is_moco_v3s_with_keys_gathered_over_the_devices(devices):
    rng = np.random.default_rng(1)
    q1, q2, k1, k2 = (rng.normal(size=(16, 8)).astype(np.float32) for _ in range(4))
    mesh = _mesh(devices)

    def per_device(q1, q2, k1, k2):
        n = q1.shape[0]
        offset = jax.lax.axis_index(step_lib.AXIS) * n
        k1_all = jax.lax.all_gather(k1, step_lib.AXIS, tiled=True)
        k2_all = jax.lax.all_gather(k2, step_lib.AXIS, tiled=True)
        local = (pretrain.contrastive_loss(q1, k2_all, offset, 0.2)
                 + pretrain.contrastive_loss(q2, k1_all, offset, 0.2))
        return jax.lax.psum(local, step_lib.AXIS) / (jax.lax.psum(1, step_lib.AXIS) * n)

    loss = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(step_lib.AXIS),) * 4,
                                 out_specs=P()))(q1, q2, k1, k2)
    expected = _numpy_ctr(q1, k2, 0.2) + _numpy_ctr(q2, k1, 0.2)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_one_step_is_the_same_on_1_and_8_devices():
    config = _config()
    results = []
    for n in (1, 8):
        mesh = _mesh(n)
        _, state, step = _setup(config, mesh)
        state = jax.device_put(state, NamedSharding(mesh, P()))
        state, metrics = step(state, _batch(mesh))
        results.append((jax.device_get(metrics), jax.device_get(state)))
    (m1, s1), (m8, s8) = results
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
    # The momentum network moved with the parameters before the step: identical.
    for a, b in zip(jax.tree.leaves(s1.momentum), jax.tree.leaves(s8.momentum), strict=True):
        np.testing.assert_array_equal(a, b)
    # BatchNorm statistics of the heads: synchronised over the 8 devices = the global batch's.
    for a, b in zip(jax.tree.leaves(s1.rest["projector"]), jax.tree.leaves(s8.rest["projector"]),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_momentum_update_and_its_schedule():
    assert float(moco.momentum_at(0, 100, 0.99)) == pytest.approx(0.99)
    assert float(moco.momentum_at(50, 100, 0.99)) == pytest.approx(0.995)
    assert float(moco.momentum_at(100, 100, 0.99)) == pytest.approx(1.0)
    config = _config()
    mesh = _mesh(8)
    _, state, step = _setup(config, mesh)
    noise = jax.tree.map(lambda x: 0.01 * np.ones_like(x), state.momentum)
    state = state.replace(momentum=jax.tree.map(lambda m, e: m + e, state.momentum, noise))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    before = jax.device_get(state)
    after, metrics = step(state, _batch(mesh))
    m = np.float32(metrics["momentum"])
    assert m == np.float32(0.99)
    after = jax.device_get(after)
    for name in ("encoder", "projector"):
        for k0, q0, k1 in zip(jax.tree.leaves(before.momentum[name]),
                              jax.tree.leaves(before.params[name]),
                              jax.tree.leaves(after.momentum[name]), strict=True):
            np.testing.assert_allclose(k1, m * k0 + (np.float32(1) - m) * q0, rtol=1e-6,
                                       atol=1e-7)
    assert set(after.momentum) == {"encoder", "projector"}    # no predictor in the key net
    # The ViT's patch projection is frozen (MoCo v3); the rest of the query moves (from the
    # second step: the warmup's learning rate is 0 at the first).
    later, _ = step(jax.device_put(after, NamedSharding(mesh, P())), _batch(mesh))
    later = jax.device_get(later)
    np.testing.assert_array_equal(later.params["encoder"]["patch_embed"]["proj"]["kernel"],
                                  before.params["encoder"]["patch_embed"]["proj"]["kernel"])
    for name in ("predictor", "projector"):
        assert not np.array_equal(later.params[name]["linears"][0]["kernel"],
                                  before.params[name]["linears"][0]["kernel"])
    assert not np.array_equal(later.params["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"],
                              before.params["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"])


# ---------------------------------------------------------------- the views


def test_views_are_seeded_and_a_full_crop_without_changes_is_the_identity():
    image = jax.random.normal(jax.random.key(0), (2, 12, 12, 12, 2))
    keys = jax.random.split(jax.random.key(3), 2)
    plain = pretrain.Views(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flips=False, scale=0,
                           shift=0, blur_prob=0, noise=0)
    a, b = pretrain.two_views(image, keys, plain)
    np.testing.assert_allclose(a, image, atol=1e-5)
    np.testing.assert_allclose(b, image, atol=1e-5)
    views = pretrain.Views(mask_channels=(1,))
    a, b = pretrain.two_views(image, keys, views)
    again = pretrain.two_views(image, keys, views)
    np.testing.assert_array_equal(a, again[0])
    assert a.shape == image.shape and np.isfinite(np.asarray(a)).all()
    assert not np.allclose(a, b)                       # two different views
    # The mask channel is moved (cropped, flipped) but never rescaled, shifted or noised.
    mask = (jax.random.uniform(jax.random.key(5), (2, 12, 12, 12)) > 0.5).astype(jnp.float32)
    image = image.at[..., 1].set(mask)
    a, _ = pretrain.two_views(image, keys, views)
    assert float(a[..., 1].min()) >= 0 and float(a[..., 1].max()) <= 1


def test_the_crop_is_trilinear_sampling_of_the_box_as_map_coordinates_computes_it():
    """The separable crop (three interpolation matmuls) against the direct rule: the box's
    voxel centres sampled with ``map_coordinates(order=1, mode='nearest')``, a 3D gather of 8
    neighbours, for boxes of every size and place (edges included)."""
    x = jax.random.normal(jax.random.key(1), (14, 11, 9, 2))
    shape = np.asarray(x.shape[:3], np.float32)
    for seed in range(12):
        views = pretrain.Views(crop_scale=(0.2, 1.0), crop_ratio=(0.6, 1.6))
        key = jax.random.key(seed)
        got = pretrain._random_crop(x, key, views)
        k_scale, k_ratio, k_place = jax.random.split(key, 3)   # the crop's own draws
        scale = float(jax.random.uniform(k_scale, (), minval=0.2, maxval=1.0))
        log_ratio = np.asarray(jax.random.uniform(k_ratio, (3,), minval=np.log(0.6),
                                                  maxval=np.log(1.6)))
        side = np.clip(scale ** (1 / 3) * np.exp(log_ratio - log_ratio.mean()), 0, 1)
        start = np.asarray(jax.random.uniform(k_place, (3,))) * (1 - side)
        grid = np.meshgrid(*[start[a] * shape[a] + (np.arange(x.shape[a]) + 0.5) * side[a] - 0.5
                             for a in range(3)], indexing="ij")
        want = np.stack([jax.scipy.ndimage.map_coordinates(x[..., c], grid, order=1,
                                                           mode="nearest")
                         for c in range(x.shape[-1])], axis=-1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_blur_folded_into_the_crop_is_the_filter_applied_in_mocos_order():
    """A view with the blur on is the same view without it (crop, flips, scale, shift), then
    filtered along each axis by 5 Gaussian taps with edges repeated (scipy's ``correlate1d``,
    mode 'nearest'), for the sigma the view drew; the mask channel is not blurred."""
    from scipy import ndimage

    image = np.array(jax.random.normal(jax.random.key(7), (13, 10, 9, 2)))
    image[..., 1] = image[..., 1] > 0.5
    common = dict(crop_scale=(0.3, 1.0), scale=0.2, shift=0.2, noise=0.0,
                  blur_sigma=(0.1, 1.5), mask_channels=(1,))
    for seed in range(6):
        key = jax.random.key(seed)
        plain = np.asarray(pretrain.one_view(image, key, pretrain.Views(blur_prob=0.0,
                                                                        **common)))
        got = np.asarray(pretrain.one_view(image, key, pretrain.Views(blur_prob=1.0, **common)))
        k_sigma = jax.random.split(jax.random.split(key, 6)[4])[1]   # the view's own draw
        sigma = float(jax.random.uniform(k_sigma, (), minval=0.1, maxval=1.5))
        taps = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2)
        want = plain[..., 0]
        for axis in range(3):
            want = ndimage.correlate1d(want, taps / taps.sum(), axis=axis, mode="nearest")
        np.testing.assert_allclose(got[..., 0], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[..., 1], plain[..., 1])
        assert not np.allclose(got[..., 0], plain[..., 0], atol=1e-3)


# ---------------------------------------------------------------- the run


def _her2jax(workdir: Path, data_dir: Path, *extra: str, wait: bool = True):
    return run_her2jax("pretrain", workdir, data_dir, PRETRAIN_ARGS, *extra, wait=wait,
                       timeout=600)


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """A 30-step tiny pretraining through the CLI, uninterrupted (read-only for tests)."""
    workdir = tmp_path_factory.mktemp("pretrain") / "run"
    result = _her2jax(workdir, data_dir)
    return workdir, result.stdout


def _latest_state(workdir: Path, config):
    query = pretrain.build_query(config, bn_axis_name=step_lib.AXIS)
    optimizer = pretrain.make_optimizer(config, nnx.state(query, nnx.Param),
                                        total_steps=config.train.steps)
    graphdef, state = pretrain.create_state(query, optimizer, 0)
    with checkpoint.Checkpoints(workdir, save_every=1) as checkpoints:
        return graphdef, checkpoints.restore_latest(checkpoint.abstract_like(state))


def _run_config(workdir: Path):
    import ml_collections

    return ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text())["config"])


def test_pretraining_logs_its_loss_and_monitor_and_exports_a_port(pretrained, data_dir):
    workdir, stdout = pretrained
    assert "pretrained 30 steps; contrastive loss" in stdout and "kNN macro AUC" in stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in records if r["split"] == "val"] == [15, 30]
    assert all(0 <= r["knn_macro_auc"] <= 1 for r in records if r["split"] == "val")
    meta = json.loads((workdir / "encoder" / "port.json").read_text())
    assert meta["source"] == pretrain.SOURCE and meta["architecture"]["kind"] == "vit3d"
    # A classifier built with model.pretrained=<the export> has the pretrained query encoder:
    # its features are those of the last checkpoint's encoder.
    from her2jax.models import factory

    config = _run_config(workdir)
    graphdef, state = _latest_state(workdir, config)
    query = nnx.merge(graphdef, state.params, state.rest)
    query.eval()
    classifier_config = load_config("tiny_cpu")
    classifier_config.data.recipe.shape = (24, 24, 24)
    classifier_config.model.pretrained = str(workdir / "encoder")
    classifier = factory.build_model(classifier_config)
    classifier.eval()
    x = jax.random.normal(jax.random.key(2), (2, 24, 24, 24, 1))
    np.testing.assert_allclose(classifier.features(x), query.features(x), rtol=1e-5,
                               atol=1e-6)


def test_pretraining_resumes_bitwise_after_sigkill(pretrained, data_dir, tmp_path):
    reference, _ = pretrained
    workdir = tmp_path / "run"
    process = _her2jax(workdir, data_dir, wait=False)
    assert kill_at_first_checkpoint(process, workdir / "checkpoints" / "latest") < 30
    _her2jax(workdir, data_dir)
    config = _run_config(reference)
    _, a = _latest_state(reference, config)
    _, b = _latest_state(workdir, config)
    assert int(a.step) == int(b.step) == 30
    for x, y in zip(jax.tree.leaves((a.params, a.momentum, a.rest, a.opt_state)),
                    jax.tree.leaves((b.params, b.momentum, b.rest, b.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Run once more: nothing left to train; it reports the run's last logged figures (it
    # used to format a missing loss and end in a TypeError)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in records if r["split"] == "train"][-1]
    knn = [r["knn_macro_auc"] for r in records if r["split"] == "val"][-1]
    again = _her2jax(workdir, data_dir)
    assert f"pretrained 30 steps; contrastive loss {loss:.3f}; kNN macro AUC {knn:.3f}" in (
        again.stdout), again.stdout


def _classifier_features(encoder: Path, x):
    from her2jax.models import factory

    config = load_config("tiny_cpu")
    config.data.recipe.shape = x.shape[1:4]
    config.model.pretrained = str(encoder)
    classifier = factory.build_model(config)
    classifier.eval()
    return np.asarray(classifier.features(x))


def test_the_best_knn_step_is_exported_and_patience_stops_pretraining(data_dir, tmp_path):
    """``pretrain.export='best_knn'``: the encoder is the monitored step with the highest kNN
    macro AUC (checkpoints/best); ``train.early_stop_patience=2`` stops at the second
    evaluation in a row without a better one, and a rerun stays stopped."""
    workdir = tmp_path / "run"
    extra = ("--config.pretrain.export=best_knn", "--config.train.early_stop_patience=2",
             "--config.train.eval_every=3")
    first = _her2jax(workdir, data_dir, *extra)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    monitored = [(r["step"], r["knn_macro_auc"]) for r in records if r["split"] == "val"]
    # What the rule says, from the logged values: the first strict maximum is kept, and the
    # run stops at the second evaluation in a row that does not beat it.
    best_step, best, since, stop = None, -1.0, 0, 30
    for step, value in monitored:
        if value > best:
            best_step, best, since = step, value, 0
        else:
            since += 1
        if since == 2:
            stop = step
            break
    assert stop < 30, monitored            # the monitor does not rise 10 times in a row here
    assert monitored[-1][0] == stop        # nothing was monitored after the stop
    assert best_step < stop
    assert (f"pretrained {stop} steps (stopped early: the kNN monitor stopped rising)" in
            first.stdout and f"the encoder is step {best_step}'s" in first.stdout), first.stdout
    meta = json.loads((workdir / "encoder" / "port.json").read_text())
    assert meta["checkpoint"] == str(workdir / "checkpoints" / "best" / str(best_step))
    # The exported encoder is checkpoints/best's query encoder, not the last step's.
    config = _run_config(workdir)
    query = pretrain.build_query(config, bn_axis_name=step_lib.AXIS)
    optimizer = pretrain.make_optimizer(config, nnx.state(query, nnx.Param),
                                        total_steps=config.train.steps)
    graphdef, state = pretrain.create_state(query, optimizer, 0)
    with checkpoint.Checkpoints(workdir, save_every=1) as checkpoints:
        target = checkpoint.abstract_like(state)
        kept, last = checkpoints.restore_best(target), checkpoints.restore_latest(target)
    assert int(kept.step) == best_step and int(last.step) == stop
    x = jax.random.normal(jax.random.key(3), (2, 24, 24, 24, 1))
    features = {}
    for name, s in (("best", kept), ("last", last)):
        model = nnx.merge(graphdef, s.params, s.rest)
        model.eval()
        features[name] = np.asarray(model.features(x))
    exported = _classifier_features(workdir / "encoder", x)
    np.testing.assert_allclose(exported, features["best"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(exported, features["last"], atol=1e-4)
    # A rerun finds the run stopped: no step more, the same encoder and message.
    again = _her2jax(workdir, data_dir, *extra)
    assert (f"pretrained {stop} steps (stopped early" in again.stdout and
            f"the encoder is step {best_step}'s" in again.stdout), again.stdout
    assert (workdir / "metrics.jsonl").read_text().count("\n") == len(records)
    np.testing.assert_array_equal(_classifier_features(workdir / "encoder", x), exported)


def test_an_unlabelled_cohort_prepares_and_pretrains(phantom_cohort, tmp_path):
    from her2jax.data import prepare

    cohort = tmp_path / "cohort"
    shutil.copytree(phantom_cohort, cohort)
    rows = list(csv.DictReader(open(cohort / "clinical.csv")))
    keep = ["patient_id", "center", "manufacturer", "field_strength", "acquisition_times"]
    with open(cohort / "clinical.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keep)
        writer.writeheader()
        writer.writerows({k: r[k] for k in keep} for r in rows)
    config = load_config("pretrain_tiny")
    result = subprocess.run([sys.executable, "-m", "her2jax.cli.prepare", f"--cohort={cohort}",
                             f"--data_dir={tmp_path / 'refused'}", "--noprogress"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--norequire_labels" in result.stderr
    prepared = prepare.prepare(cohort, tmp_path / "data", config.data, workers=1,
                               progress=False, require_labels=False)
    dataset = pipeline.open_dataset(prepared.dataset_dir.parents[2], config.data)
    split = pretrain.pretraining_split(dataset, config.data)
    assert len(split) == len(rows) and (split.labels == -1).all()
    config.data.data_dir = str(prepared.dataset_dir.parents[2])
    config.train.update(steps=4, warmup_steps=1, eval_every=4, save_every=4, log_every=2)
    result = pretrain.run(config, tmp_path / "run", progress=False)
    assert result["stopped"] == "done" and result["knn_macro_auc"] is None   # nothing labelled
    assert (tmp_path / "run" / "encoder" / "port.json").exists()
    # Without labels there is no monitor to choose a step or stop on: said before any step.
    for key, value in (("pretrain.export", "best_knn"), ("train.early_stop_patience", 2)):
        refused = config.copy_and_resolve_references()
        section, name = key.split(".")
        refused[section][name] = value
        with pytest.raises(Her2jaxError, match="needs the kNN monitor") as error:
            pretrain.run(refused, tmp_path / f"refused-{name}", progress=False)
        assert error.value.key == key
        assert not (tmp_path / f"refused-{name}" / "checkpoints").exists()


@pytest.mark.parametrize(("key", "value", "named"), [
    ("pretrain.temperature", 0.0, "pretrain.temperature"),
    ("pretrain.momentum", 1.0, "pretrain.momentum"),
    ("pretrain.crop_scale", (0.5, 1.5), "pretrain.crop_scale"),
    ("pretrain.blur_prob", 2.0, "pretrain.blur_prob"),
    ("pretrain.dim", 0, "pretrain.dim"),
    ("pretrain.export", "best_loss", "pretrain.export"),
    ("train.grad_accum", 2, "train.grad_accum"),
    ("train.freeze_steps", 10, "train.freeze_steps"),
])
def test_bad_pretraining_settings_are_one_line_errors(key, value, named):
    config = load_config("pretrain_tiny")
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(Her2jaxError, match=named.replace(".", r"\.")) as error:
        pretrain.check_pretrain_config(config)
    assert "\n" not in str(error.value)
    del config.pretrain
    with pytest.raises(Her2jaxError, match="no pretrain section"):
        pretrain.check_pretrain_config(config)


def test_the_default_section_is_moco_v3s_recipe():
    p = defaults.pretrain_config()
    assert (p.dim, p.mlp_dim, p.temperature, p.momentum) == (256, 4096, 0.2, 0.99)
    vit = load_config("pretrain_vit")
    assert vit.train.weight_decay == 0.1 and vit.train.learning_rate == pytest.approx(
        1.5e-4 * vit.train.batch_size / 256)
    assert moco.projector_dims("vit3d", 768, 4096, 256) == (768, 4096, 4096, 256)
    assert moco.projector_dims("resnet3d", 512, 4096, 256) == (512, 4096, 256)
    # MoCo_ViT's predictor ends with BatchNorm1d(affine=False), MoCo_ResNet's with its Linear.
    for kind, last_norm in (("vit3d", True), ("resnet3d", False)):
        config = _config()
        config.model.encoder = kind
        config.model.resnet.update(depth=10, widen_factor=0.125)
        query = nnx.eval_shape(lambda config=config: pretrain.build_query(config))
        assert len(query.predictor.norms) == (2 if last_norm else 1), kind
        assert len(query.projector.norms) == (3 if kind == "vit3d" else 2), kind


def test_pretraining_continues_from_fm_bcmris_momentum_encoder(tmp_path):
    """A MoCo v3 file's key encoder is kept by the port and becomes the key network's."""
    torch = pytest.importorskip("torch")
    from her2jax.models import factory, port

    from .test_port import VIT_CONFIGS, TorchViT3D

    cfg = VIT_CONFIGS["tiny"]
    torch.manual_seed(0)
    base = TorchViT3D(**cfg).eval()
    torch.manual_seed(1)
    key = TorchViT3D(**cfg).eval()   # a momentum encoder that differs from the base one
    state = {"base_encoder." + k: v for k, v in base.timm_state_dict().items()}
    state |= {"momentum_encoder." + k: v for k, v in key.timm_state_dict().items()}
    torch.save({"epoch": 300, "state_dict": state}, tmp_path / "moco.pth.tar")
    report = port.port("fmbcmri", tmp_path / "moco.pth.tar", tmp_path / "port",
                       num_heads=cfg["heads"])
    assert report.momentum_encoder and port.holds(tmp_path / "port", port.MOMENTUM_DIR)
    # Its base_encoder.head is a plain Linear, not MoCo v3's projector: no heads kept.
    assert report.moco_heads is None and not port.holds(tmp_path / "port", port.HEADS_DIR)
    assert json.loads((tmp_path / "port" / "port.json").read_text())["momentum_encoder"]

    config = _config()
    config.model.pretrained = str(tmp_path / "port")
    query = pretrain.build_query(config)
    optimizer = pretrain.make_optimizer(config, nnx.state(query, nnx.Param), total_steps=10)
    _, state = pretrain.create_state(query, optimizer, 0,
                                     key_encoder=pretrain.port_key_encoder(config))
    reference = nnx.eval_shape(lambda: factory.build_encoder(config, rngs=nnx.Rngs(0)))
    port.load_pretrained(reference, tmp_path / "port", state_dir=port.MOMENTUM_DIR)
    expected = nnx.state(reference, nnx.Param)
    for a, b in zip(jax.tree.leaves(state.momentum["encoder"]), jax.tree.leaves(expected),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    qkv = ("blocks", 0, "attn", "qkv", "kernel")
    query_kernel, key_kernel = state.params["encoder"], state.momentum["encoder"]
    for part in qkv:
        query_kernel, key_kernel = query_kernel[part], key_kernel[part]
    assert not np.allclose(query_kernel[...], key_kernel[...])   # the base encoder's vs the key's
    # A port without one (another source) starts the key network as a copy of the query's.
    config.model.pretrained = ""
    assert pretrain.port_key_encoder(config) is None


def _moco_v3_mlp(torch, dims, *, last_bn):
    """MoCo v3's ``_build_mlp`` layout (bias-free Linears, BatchNorm1d after each hidden one,
    BatchNorm1d(affine=False) last when ``last_bn``), with non-trivial BatchNorm values."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b, bias=False))
        if i < len(dims) - 2:
            layers += [torch.nn.BatchNorm1d(b), torch.nn.ReLU()]
        elif last_bn:
            layers.append(torch.nn.BatchNorm1d(b, affine=False))
    mlp = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for layer in mlp:
            if isinstance(layer, torch.nn.BatchNorm1d):
                layer.running_mean.normal_()
                layer.running_var.uniform_(0.5, 2.0)
                if layer.affine:
                    layer.weight.uniform_(0.5, 1.5)
                    layer.bias.normal_()
    return mlp.eval()


def test_pretraining_continues_with_fm_bcmris_projector_and_predictor(tmp_path):
    """A MoCo v3 file's heads (``base_encoder.head``, ``predictor``, ``momentum_encoder.head``)
    are kept by the port and start the run's projector, predictor and key projector: the
    query network then computes the file's ``predictor(base_encoder(x))``."""
    torch = pytest.importorskip("torch")
    from her2jax.models import port

    from .test_port import VIT_CONFIGS, TorchViT3D

    cfg = VIT_CONFIGS["tiny"]
    torch.manual_seed(0)
    base, key = TorchViT3D(**cfg).eval(), TorchViT3D(**cfg).eval()
    projector = _moco_v3_mlp(torch, (cfg["dim"], 32, 32, 16), last_bn=True)
    key_projector = _moco_v3_mlp(torch, (cfg["dim"], 32, 32, 16), last_bn=True)
    predictor = _moco_v3_mlp(torch, (16, 32, 16), last_bn=True)
    state = {}
    for prefix, encoder, head in (("base_encoder.", base, projector),
                                  ("momentum_encoder.", key, key_projector)):
        state |= {prefix + k: v for k, v in encoder.timm_state_dict().items()
                  if not k.startswith("head.")}
        state |= {f"{prefix}head.{k}": v for k, v in head.state_dict().items()}
    state |= {f"predictor.{k}": v for k, v in predictor.state_dict().items()}
    # As MoCo v3 saves it: DistributedDataParallel's module. prefix on every key.
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": {
        "module." + k: v for k, v in state.items()}}, tmp_path / "moco.pth.tar")
    report = port.port("fmbcmri", tmp_path / "moco.pth.tar", tmp_path / "port",
                       num_heads=cfg["heads"])
    assert report.moco_heads == {
        "projector": {"widths": [cfg["dim"], 32, 32, 16], "last_bn": True},
        "predictor": {"widths": [16, 32, 16], "last_bn": True},
        "key_projector": {"widths": [cfg["dim"], 32, 32, 16], "last_bn": True}}
    assert "MoCo v3 heads kept" in report.summary()

    config = _config()
    config.model.pretrained = str(tmp_path / "port")
    query = pretrain.build_query(config)
    key_projector_state = pretrain.load_port_heads(query, config)
    assert key_projector_state is not None
    optimizer = pretrain.make_optimizer(config, nnx.state(query, nnx.Param), total_steps=10)
    graphdef, state = pretrain.create_state(query, optimizer, 0,
                                            key_encoder=pretrain.port_key_encoder(config),
                                            key_projector=key_projector_state)
    # The query network is the file's: predictor(projector(features)), BatchNorm in eval mode.
    x = np.random.default_rng(2).standard_normal((3, 16, 16, 16, 1)).astype(np.float32)
    model = nnx.merge(graphdef, state.params, state.rest)
    model.eval()
    ours = np.asarray(model(x))
    with torch.no_grad():
        theirs = predictor(projector(base(torch.from_numpy(x).permute(0, 4, 1, 2, 3)))).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    # The key network's projector is the file's momentum_encoder.head: its parameters (the
    # key network runs in training mode, on batch statistics, as in the pretraining step).
    key_net = nnx.merge(graphdef, nnx.State({**state.params, **state.momentum}), state.rest)
    key_net.train()
    with torch.no_grad():
        expected = key_projector.train()(key(torch.from_numpy(x).permute(0, 4, 1, 2, 3)))
        expected = expected.numpy()
    np.testing.assert_allclose(np.asarray(pretrain.key_view(key_net)(x)), expected,
                               rtol=1e-4, atol=1e-4)

    # Other widths: the heads are left alone (they start fresh), the encoder still loads.
    config.pretrain.mlp_dim = 64
    fresh = pretrain.build_query(config)
    assert pretrain.load_port_heads(fresh, config) is None
    assert fresh.projector.linears[0].kernel.shape == (cfg["dim"], 64)


def _roi_config():
    """The demo's tumour-region network alone (encoder 'none') with a pretrain section."""
    config = load_config("demo_cpu")
    config.data.recipe.shape = (16, 16, 16)
    with config.unlocked():
        config.pretrain = defaults.pretrain_config()
    config.pretrain.update(dim=16, mlp_dim=32)
    config.train.update(steps=10, warmup_steps=0)     # the first step moves the parameters
    return config


def test_the_tumour_region_network_pretrains_and_exports_a_port_fine_tuning_loads(tmp_path):
    """encoder 'none': the tumour-region network is the encoder MoCo trains (CNN heads: a
    2-layer projector, no final BatchNorm in the predictor); its export is a port the
    classifier loads into its tumour-region branch, and that refuses other shells or
    another encoder."""
    from her2jax.models import factory

    config = _roi_config()
    mesh = _mesh(8)
    graphdef, state, step = _setup(config, mesh)
    query = nnx.merge(graphdef, state.params, state.rest)
    assert type(query.encoder).__name__ == "RoiPool" and query.encoder.features_dim == 34
    assert len(query.projector.linears) == 2 and not query.predictor.last_bn
    rng = np.random.default_rng(0)
    image = rng.normal(0.5, 0.3, size=(16, 16, 16, 16, 3)).astype(np.float32)
    image[..., 2] = 0.0
    for b in range(16):                       # tumours of different sizes
        image[b, 5:8 + b % 5, 5:9, 4:10, 2] = 1.0
    sharding = NamedSharding(mesh, P(step_lib.AXIS))
    batch = {"image": jax.device_put(image, sharding),
             "index": jax.device_put(np.arange(16, dtype=np.int32), sharding)}
    before = jax.device_get(state.params["encoder"])
    state = jax.device_put(state, NamedSharding(mesh, P()))
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         before, jax.device_get(state.params["encoder"]))
    assert all(jax.tree.leaves(moved))

    pretrain.export_encoder(tmp_path / "encoder", config, graphdef, state, origin="test")
    meta = json.loads((tmp_path / "encoder" / "port.json").read_text())
    rim = list(config.model.roi_pool.rim_voxels)          # the demo's shells
    assert meta["architecture"] == dict(kind="roi_pool", in_channels=3, mask_channel=2,
                                        hidden=8, rim_voxels=rim, standardize=False)
    config.model.pretrained = str(tmp_path / "encoder")
    classifier = factory.build_model(config)
    query = nnx.merge(graphdef, *jax.device_get((state.params, state.rest)))
    classifier.eval(), query.eval()
    np.testing.assert_allclose(classifier.roi(image[:4]), query.features(image[:4]),
                               rtol=1e-5, atol=1e-6)
    config.model.roi_pool.rim_voxels = (rim[0], rim[1] + 1)   # same parameters, other features
    with pytest.raises(Her2jaxError, match=rf"rim_voxels=\[{rim[0]}, {rim[1]}\].*"
                                           r"model\.roi_pool\.rim_voxels"):
        factory.build_model(config)
    vit = load_config("tiny_cpu")
    vit.model.pretrained = str(tmp_path / "encoder")
    with pytest.raises(Her2jaxError, match="port holds a roi_pool encoder"):
        factory.build_model(vit)
