"""Orbax checkpoints: round trip, interval / keep / best policies, config, the non-finite
guard, the corrupt-newest-step fallback and restoring onto another mesh."""

from __future__ import annotations

import functools
import gc
import glob
import logging
import os
import shutil
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from her2jax.errors import Her2jaxError
from her2jax.models import heads, resnet3d, vit3d
from her2jax.train import checkpoint
from her2jax.train import state as train_state

# When one array fails to read, orbax 0.12.8 abandons the other reads: its coroutines turn
# the GeneratorExit of their cleanup into an Exception, and tensorstore calls back into a
# closed event loop. Python reports both as unraisable (the restore itself fails cleanly).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Exception ignored in. <coroutine object "
                               "_read_array_index_and_device_put"
                               ":pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:Exception ignored in. None"
                               ":pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine '_read_array_index_and_device_put' was never "
                               "awaited:RuntimeWarning"),
]

CONFIG = {"model": {"encoder": "vit3d", "patch_size": 8}, "train": {"lr": 1e-3},
          "data": {"shape": [16, 16, 16]}}


# --------------------------------------------------------------------------- states

def _fill(tree, seed: int):
    """Random numbers for every leaf of an abstract tree (eager random init is slow on CPU)."""
    rng = np.random.default_rng(seed)

    def leaf(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(int(rng.integers(2**31)))
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype))
        return jnp.asarray(rng.integers(0, 1000, x.shape).astype(x.dtype))
    return jax.tree.map(leaf, tree)


def _vit(embed_dim: int = 48):
    rngs = nnx.Rngs(0)
    encoder = vit3d.ViT3D(in_channels=1, input_shape=(16, 16, 16), patch_size=8,
                          embed_dim=embed_dim, depth=2, num_heads=2, rngs=rngs)
    return heads.Classifier(encoder, heads.Head(embed_dim, 3, rngs=rngs))


def _resnet():
    rngs = nnx.Rngs(0)
    encoder = resnet3d.ResNet3D(depth=10, in_channels=1, widen_factor=0.125, rngs=rngs)
    return heads.Classifier(encoder, heads.Head(encoder.features_dim, 3, rngs=rngs))


@functools.cache
def _base_state(kind: str) -> train_state.TrainState:
    model = nnx.eval_shape({"vit": _vit, "resnet": _resnet}[kind])
    graphdef, abstract = nnx.split(model)
    model = nnx.merge(graphdef, _fill(abstract, seed=1))
    _, state = train_state.create(model, optax.adamw(1e-3), seed=0)
    # Non-zero moments and count, so the optimizer state's round trip means something.
    return state.replace(opt_state=_fill(state.opt_state, seed=2))


def make_state(step: int, kind: str = "vit") -> train_state.TrainState:
    """A realistic small TrainState at ``step`` (different steps differ in ``step``)."""
    return _base_state(kind).replace(step=jnp.asarray(step, jnp.int32))


def _variables(tree):
    return [v for v in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
            if isinstance(v, nnx.Variable)]


def _raw(x) -> np.ndarray:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def assert_identical(restored, original):
    """Same pytree (types, nnx.State fields, Variable types) and bitwise-equal leaves."""
    assert type(restored) is type(original)
    assert jax.tree.structure(restored) == jax.tree.structure(original)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(original), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _raw(a).tobytes() == _raw(b).tobytes()


def _with_one_leaf(tree, value, index: int = 3):
    """``tree`` with ``value`` written into element 0 of its ``index``-th float leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    floats = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating)]
    i = floats[index]
    leaves[i] = leaves[i].reshape(-1).at[0].set(value).reshape(leaves[i].shape)
    return jax.tree.unflatten(treedef, leaves)


def _settle_abandoned_reads():
    """Lets orbax's abandoned reads finish and be collected within the test that caused
    them (see ``pytestmark``), not in whichever test runs next."""
    time.sleep(0.2)
    gc.collect()


def _steps(path) -> list[int]:
    return sorted(int(p) for p in os.listdir(path) if p.isdigit())


@pytest.fixture
def ckpts(tmp_path):
    c = checkpoint.Checkpoints(tmp_path, save_every=10)
    yield c
    c.close()


# --------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("kind,async_save", [("vit", True), ("resnet", False)])
def test_round_trip_is_bitwise_and_keeps_the_pytree_types(tmp_path, kind, async_save):
    state = make_state(10, kind)
    variable_types = {type(v) for v in _variables(state.rest)}
    assert (vit3d.PosEmbed if kind == "vit" else nnx.BatchStat) in variable_types
    assert isinstance(state.params, nnx.State) and isinstance(state.rest, nnx.State)

    with checkpoint.Checkpoints(tmp_path, save_every=10, async_save=async_save) as c:
        assert c.save_latest(10, state, config=CONFIG)
    # A new process: fresh managers that learn nothing from the save above.
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        assert c.latest_step() == 10
        restored = c.restore_latest(checkpoint.abstract_like(state))
    assert_identical(restored, state)
    assert isinstance(restored.params, nnx.State) and isinstance(restored.rest, nnx.State)
    assert {type(v) for v in _variables(restored.rest)} == variable_types
    assert int(restored.step) == 10


def test_fresh_start_restores_none(ckpts):
    assert ckpts.latest_step() is None
    assert ckpts.restore_latest(checkpoint.abstract_like(make_state(0))) is None


def test_abstract_like_keeps_structure_and_takes_a_sharding():
    state = make_state(0)
    abstract = checkpoint.abstract_like(state)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    replicated = NamedSharding(jax.make_mesh((2,), ("data",), devices=jax.devices()[:2]), P())
    shapes = checkpoint.abstract_like(jax.eval_shape(lambda: state), replicated)
    assert {x.sharding for x in jax.tree.leaves(shapes)} == {replicated}


# --------------------------------------------------------------------------- policies

def test_saves_at_multiples_of_save_every_unless_forced_and_keeps_the_two_newest(tmp_path):
    with checkpoint.Checkpoints(tmp_path, save_every=5, keep_latest=2) as c:
        saved = [step for step in range(1, 17) if c.save_latest(step, make_state(step),
                                                                config=CONFIG)]
        assert saved == [5, 10, 15]      # no "initial save" at step 1 (orbax's default)
        assert c.save_latest(16, make_state(16), config=CONFIG, force=True)
        assert not c.save_latest(16, make_state(16), config=CONFIG, force=True)  # saved
        c.wait_until_finished()
        assert c.latest_step() == 16
        assert _steps(tmp_path / "checkpoints" / "latest") == [15, 16]


def test_a_preemption_notice_saves_off_the_interval(ckpts, monkeypatch):
    assert ckpts.reached_preemption(7) is False      # no preemption service here
    monkeypatch.setattr(ckpts, "reached_preemption", lambda step: step == 7)
    assert not ckpts.save_latest(6, make_state(6), config=CONFIG)
    assert ckpts.save_latest(7, make_state(7), config=CONFIG)
    ckpts.wait_until_finished()
    assert ckpts.latest_step() == 7


def test_best_keeps_the_highest_metric_and_leaves_latest_alone(tmp_path):
    with checkpoint.Checkpoints(tmp_path, save_every=10, keep_latest=2) as c:
        kept = []
        for step, metric in [(10, 0.6), (20, 0.8), (30, 0.7)]:
            state = make_state(step)
            assert c.save_latest(step, state, config=CONFIG)
            kept.append(c.save_best(step, state, config={**CONFIG, "auc": metric},
                                    metric=metric))
        assert not c.save_best(40, make_state(40), config=CONFIG, metric=float("nan"))
        c.wait_until_finished()
        assert kept == [True, True, False]
        assert c.best_step() == 20 and c.best_metric() == pytest.approx(0.8)
        assert _steps(tmp_path / "checkpoints" / "best") == [20]
        assert _steps(tmp_path / "checkpoints" / "latest") == [20, 30]
        assert c.latest_step() == 30
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        assert_identical(c.restore_best(checkpoint.abstract_like(make_state(0))), make_state(20))
        assert c.restored_config("best")["auc"] == 0.8
        assert c.latest_step() == 30
        # A resumed run knows the best metric, and a better result replaces the best step.
        assert c.best_metric() == pytest.approx(0.8)
        assert not c.save_best(40, make_state(40), config=CONFIG, metric=0.75)
        assert c.save_best(20, make_state(21), config=CONFIG, metric=0.9)
        c.wait_until_finished()
        assert c.best_step() == 20 and c.best_metric() == pytest.approx(0.9)
        assert _steps(tmp_path / "checkpoints" / "best") == [20]
        assert_identical(c.restore_best(checkpoint.abstract_like(make_state(0))), make_state(21))


def test_no_best_checkpoint_is_a_user_error(ckpts):
    with pytest.raises(Her2jaxError, match="no best checkpoint"):
        ckpts.restore_best(checkpoint.abstract_like(make_state(0)))
    with pytest.raises(Her2jaxError, match="no checkpoint in best"):
        ckpts.restored_config("best")


def test_config_is_saved_beside_the_state(tmp_path):
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        c.save_latest(10, make_state(10), config=CONFIG)
        c.save_latest(20, make_state(20), config={**CONFIG, "train": {"lr": 5e-4}})
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        assert c.restored_config() == {**CONFIG, "train": {"lr": 5e-4}}
        assert c.restored_config("latest", step=10) == CONFIG
        with pytest.raises(Her2jaxError, match="no checkpoint at step 30"):
            c.restored_config("latest", step=30)
        with pytest.raises(Her2jaxError, match="unknown checkpoint manager"):
            c.restored_config("newest")
        with pytest.raises(TypeError):       # raised here, not in the background writer
            c.save_latest(30, make_state(30), config={"bad": object()})


# --------------------------------------------------------------------------- non-finite

@pytest.mark.parametrize("part,value", [("params", np.nan), ("opt_state", np.inf)])
def test_a_non_finite_state_is_never_written(ckpts, tmp_path, part, value):
    good = make_state(10)
    assert ckpts.save_latest(10, good, config=CONFIG)
    bad = make_state(20)
    bad = bad.replace(**{part: _with_one_leaf(getattr(bad, part), value)})
    with pytest.raises(Her2jaxError, match=f"non-finite {part} at step 20") as err:
        ckpts.save_latest(20, bad, config=CONFIG)
    assert err.value.key == part and "last good checkpoint is intact" in str(err.value)
    with pytest.raises(Her2jaxError, match="step 20"):
        ckpts.save_best(20, bad, config=CONFIG, metric=0.9)
    ckpts.wait_until_finished()
    assert os.listdir(tmp_path / "checkpoints" / "latest") == ["10"]
    assert os.listdir(tmp_path / "checkpoints" / "best") == []
    assert ckpts.latest_step() == 10
    assert_identical(ckpts.restore_latest(checkpoint.abstract_like(good)), good)


def test_check_finite_accepts_a_finite_state_and_names_every_bad_part():
    state = make_state(3, "resnet")
    checkpoint.check_finite(state, 3)
    bad = state.replace(rest=_with_one_leaf(state.rest, np.nan, index=0),
                        opt_state=_with_one_leaf(state.opt_state, -np.inf))
    with pytest.raises(Her2jaxError, match="non-finite opt_state and rest at step 3"):
        checkpoint.check_finite(bad, 3)


# --------------------------------------------------------------------------- corrupt step

def _truncate_data(step_dir):
    files = glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(8)


def _delete_data(step_dir):
    for f in glob.glob(str(step_dir / "state" / "d" / "*")):
        os.remove(f)


def _garble_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_text("{not json")


def _delete_state(step_dir):
    shutil.rmtree(step_dir / "state")


@pytest.mark.parametrize("corrupt", [_truncate_data, _delete_data, _garble_metadata,
                                     _delete_state])
def test_a_corrupt_newest_step_is_moved_aside_and_the_previous_one_restored(
        tmp_path, caplog, corrupt):
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        c.save_latest(10, make_state(10), config=CONFIG)
        c.save_latest(20, make_state(20), config=CONFIG)
    corrupt(tmp_path / "checkpoints" / "latest" / "20")

    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        assert c.latest_step() == 20          # orbax still lists it
        with caplog.at_level(logging.WARNING):
            restored = c.restore_latest(checkpoint.abstract_like(make_state(0)))
        assert_identical(restored, make_state(10))
        _settle_abandoned_reads()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("latest step 20 is unreadable" in w and "corrupt" in w for w in warnings)
        moved = os.listdir(tmp_path / "checkpoints" / "corrupt")
        assert len(moved) == 1 and moved[0].startswith("latest-20-")
        assert c.latest_step() == 10
        assert _steps(tmp_path / "checkpoints" / "latest") == [10]
        # Training goes on from 10 and reaches 20 again: that save must work.
        new20 = make_state(20).replace(rng=make_state(20).rng + 1)
        assert c.save_latest(20, new20, config=CONFIG)
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        assert c.latest_step() == 20
        assert_identical(c.restore_latest(checkpoint.abstract_like(new20)), new20)


def test_when_every_step_is_corrupt_restore_says_so_and_returns_none(tmp_path, caplog):
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        c.save_latest(10, make_state(10), config=CONFIG)
        c.save_latest(20, make_state(20), config=CONFIG)
    for step in ("10", "20"):
        _garble_metadata(tmp_path / "checkpoints" / "latest" / step)
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c, \
            caplog.at_level(logging.WARNING):
        assert c.restore_latest(checkpoint.abstract_like(make_state(0))) is None
        assert c.latest_step() is None
    assert any("no readable checkpoint left" in r.getMessage() for r in caplog.records)
    assert len(os.listdir(tmp_path / "checkpoints" / "corrupt")) == 2


def test_a_checkpoint_of_another_model_is_an_error_not_corruption(ckpts, tmp_path):
    ckpts.save_latest(10, make_state(10), config=CONFIG)
    ckpts.wait_until_finished()
    other_state = jax.eval_shape(
        lambda: train_state.create(_vit(embed_dim=36), optax.adamw(1e-3), seed=0)[1])
    with pytest.raises(Her2jaxError, match="step 10 was written for another model"):
        ckpts.restore_latest(checkpoint.abstract_like(other_state))
    assert not (tmp_path / "checkpoints" / "corrupt").exists()
    assert ckpts.latest_step() == 10


def test_another_optimizer_state_layout_is_named_as_such(ckpts, tmp_path):
    """Same model, another optimizer state (here SGD with momentum instead of AdamW; also what
    a run checkpointed with layer_decay < 1 before 2026-11-27 meets): the error says so."""
    ckpts.save_latest(10, make_state(10), config=CONFIG)
    ckpts.wait_until_finished()
    sgd_state = jax.eval_shape(
        lambda: train_state.create(_vit(), optax.sgd(1e-3, momentum=0.9), seed=0)[1])
    with pytest.raises(Her2jaxError, match="step 10 was written with another optimizer state "
                                           "layout") as refused:
        ckpts.restore_latest(checkpoint.abstract_like(sgd_state))
    assert "opt_state" in str(refused.value) and "another model" not in str(refused.value)
    assert not (tmp_path / "checkpoints" / "corrupt").exists()
    assert ckpts.latest_step() == 10


@flax.struct.dataclass
class _StateBefore20261205:
    """``TrainState`` as her2jax saved it before it gained ``ema`` and ``momentum``."""

    step: jax.Array
    params: object
    rest: object
    opt_state: object
    rng: jax.Array


def test_a_checkpoint_from_before_the_optional_parts_resumes_and_evaluates(tmp_path):
    """Such a checkpoint holds five keys where today's hold seven (two of them empty): it is
    restored into today's state with ema and momentum None, never moved aside as corrupt
    (which made a resumed run start from scratch)."""
    state = make_state(10)
    assert state.ema is None and state.momentum is None
    old = _StateBefore20261205(state.step, state.params, state.rest, state.opt_state,
                               state.rng)
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        assert c.save_latest(10, old, config=CONFIG)
        assert c.save_best(10, old, config=CONFIG, metric=0.7)
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        metadata = c._latest.item_metadata(10).state
        assert sorted(metadata.keys()) == ["opt_state", "params", "rest", "rng", "step"]
        target = checkpoint.abstract_like(state)
        assert_identical(c.restore_latest(target), state)
        assert_identical(c.restore_best(target), state)
    assert not (tmp_path / "checkpoints" / "corrupt").exists()
    assert _steps(tmp_path / "checkpoints" / "latest") == [10]


@flax.struct.dataclass
class _StateWithAnotherPart:
    """A state as a later her2jax might lay it out: one more (empty) part."""

    step: jax.Array
    params: object
    rest: object
    opt_state: object
    rng: jax.Array
    ema: object = None
    momentum: object = None
    averaged: object = None


def test_a_readable_step_of_another_layout_is_an_error_and_stays_in_place(tmp_path):
    """Same arrays, another tree (a part this her2jax does not know): a one-line error naming
    the parts, and the step is neither moved aside nor replaced by a fresh start."""
    state = make_state(10)
    later = _StateWithAnotherPart(state.step, state.params, state.rest, state.opt_state,
                                  state.rng)
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        assert c.save_latest(10, later, config=CONFIG)
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        with pytest.raises(Her2jaxError, match="step 10 holds a state laid out otherwise "
                                               "than this her2jax's") as refused:
            c.restore_latest(checkpoint.abstract_like(state))
    assert "averaged" in str(refused.value) and "left in place" in str(refused.value)
    assert not (tmp_path / "checkpoints" / "corrupt").exists()
    assert _steps(tmp_path / "checkpoints" / "latest") == [10]


def test_todays_checkpoint_keeps_its_optional_parts_and_an_ema_one_restores_them(tmp_path):
    """Today's layout: ``ema`` and ``momentum`` are keys on disk, None or not."""
    plain = make_state(10)
    with_ema = plain.replace(ema=_fill(plain.params, seed=3))
    for name, state in (("plain", plain), ("ema", with_ema)):
        with checkpoint.Checkpoints(tmp_path / name, save_every=10) as c:
            assert c.save_latest(10, state, config=CONFIG)
        with checkpoint.Checkpoints(tmp_path / name, save_every=10) as c:
            assert {"ema", "momentum"} <= set(c._latest.item_metadata(10).state.keys())
            assert_identical(c.restore_latest(checkpoint.abstract_like(state)), state)


def test_a_bad_restore_target_is_a_bug_not_corruption(ckpts, tmp_path):
    ckpts.save_latest(10, make_state(10), config=CONFIG)
    ckpts.wait_until_finished()
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    # Axis 0 split 4 ways, which most leaves' shapes do not allow: the read fails, the files
    # are fine, so the step must stay where it is.
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, P("data") if x.ndim else P())),
        make_state(0))
    with pytest.raises(ValueError, match="evenly divide"):
        ckpts.restore_latest(target)
    _settle_abandoned_reads()
    with pytest.raises(ValueError, match="no sharding"):
        ckpts.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                          make_state(0)))
    assert not (tmp_path / "checkpoints" / "corrupt").exists()
    assert ckpts.latest_step() == 10


# --------------------------------------------------------------------------- mesh

def test_a_state_saved_on_4_devices_restores_onto_2(tmp_path):
    assert jax.device_count() >= 4, "tests/conftest.py asks for 8 CPU devices"
    mesh4 = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    mesh2 = jax.make_mesh((2,), ("data",), devices=jax.devices()[2:4])
    state = jax.device_put(make_state(10), NamedSharding(mesh4, P()))
    assert jax.tree.leaves(state)[1].sharding.mesh == mesh4
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        assert c.save_latest(10, state, config=CONFIG)

    target = checkpoint.abstract_like(jax.eval_shape(lambda: state), NamedSharding(mesh2, P()))
    with checkpoint.Checkpoints(tmp_path, save_every=10) as c:
        restored = c.restore_latest(target)
    assert_identical(restored, state)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == NamedSharding(mesh2, P())
    assert int(jax.jit(lambda s: s.step + 1)(restored)) == 11    # usable on the new mesh
    checkpoint.check_finite(restored, 10)                          # and on a mesh


# --------------------------------------------------------------------------- lifetime

def test_async_save_completes_on_wait_and_close_is_idempotent(tmp_path):
    c = checkpoint.Checkpoints(tmp_path, save_every=10, async_save=True)
    assert c.save_latest(10, make_state(10), config=CONFIG)
    assert c.save_best(10, make_state(10), config=CONFIG, metric=0.5)
    c.wait_until_finished()
    for which in ("latest", "best"):
        assert (tmp_path / "checkpoints" / which / "10" / "state" / "_METADATA").exists()
    assert not glob.glob(str(tmp_path / "checkpoints" / "*" / "*tmp*"))
    c.close()
    c.close()
