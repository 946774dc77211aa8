"""The task head and the encoder + head classifier."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from her2jax.errors import Her2jaxError
from her2jax.models import heads, vit3d


def _features(batch=4, width=16, seed=0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, width)), jnp.float32)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_logits_shape_and_dtype(num_classes):
    head = heads.Head(16, num_classes, rngs=nnx.Rngs(0))
    logits = head(_features().astype(jnp.bfloat16))
    assert logits.shape == (4, num_classes) and logits.dtype == jnp.float32
    # a plain linear layer: logits = features @ W + b
    x = _features()
    np.testing.assert_allclose(head(x), x @ head.fc.kernel[...] + head.fc.bias[...],
                               rtol=1e-6, atol=1e-6)


def test_hidden_layer_variant():
    head = heads.Head(16, 3, hidden=8, rngs=nnx.Rngs(0))
    paths = {p for p, _ in nnx.to_flat_state(nnx.state(head, nnx.Param))}
    assert paths == {("hidden", "kernel"), ("hidden", "bias"), ("fc", "kernel"), ("fc", "bias")}
    assert head.fc.kernel[...].shape == (8, 3)
    x = _features()
    expected = jax.nn.gelu(x @ head.hidden.kernel[...] + head.hidden.bias[...],
                           approximate=False) @ head.fc.kernel[...] + head.fc.bias[...]
    np.testing.assert_allclose(head(x), expected, rtol=1e-5, atol=1e-6)
    assert heads.Head(16, 3, rngs=nnx.Rngs(0)).hidden is None


@pytest.mark.parametrize("hidden", [0, 8])
def test_dropout_in_train_mode_only(hidden):
    head = heads.Head(16, 3, hidden=hidden, dropout=0.5, rngs=nnx.Rngs(0))
    stream = nnx.Rngs(dropout=1)
    x = _features()
    # train mode (the default): random masks, from a stream...
    assert not np.allclose(head(x, rngs=stream), head(x, rngs=stream))
    with pytest.raises(ValueError, match="rngs"):   # ...which train mode needs (none held)
        head(x)
    head.eval()
    first = head(x)
    np.testing.assert_array_equal(first, head(x))
    head.train()
    assert not np.allclose(head(x, rngs=stream), first)
    # rate 0 never masks, even in train mode
    plain = heads.Head(16, 3, hidden=hidden, dropout=0.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(plain(x), plain(x))


def test_per_example_dropout_keys_do_not_depend_on_the_batch_split():
    head = heads.Head(16, 3, dropout=0.5, rngs=nnx.Rngs(0))
    x = _features(batch=6)
    step_key = jax.random.fold_in(jax.random.key(0), 7)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, jnp.arange(6))   # global indices
    whole = head(x, dropout_keys=keys)
    halves = jnp.concatenate([head(x[:3], dropout_keys=keys[:3]),
                              head(x[3:], dropout_keys=keys[3:])])
    np.testing.assert_allclose(whole, halves, rtol=1e-6, atol=1e-6)
    # same keys -> same masks; other keys -> other masks
    np.testing.assert_array_equal(whole, head(x, dropout_keys=keys))
    assert not np.allclose(whole, head(x, dropout_keys=jax.random.split(jax.random.key(1), 6)))
    head.eval()
    np.testing.assert_array_equal(head(x, dropout_keys=keys), head(x))


def test_bad_head_settings_are_refused():
    with pytest.raises(Her2jaxError, match="dropout"):
        heads.Head(16, 3, dropout=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(Her2jaxError, match="positive"):
        heads.Head(16, 0, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def classifier():
    # Random values filled on the host: eager init compiles a program per parameter shape.
    abstract = nnx.eval_shape(lambda: vit3d.ViT3D(input_shape=(16, 16, 16),
                                                  **vit3d.VIT_SIZES["tiny"], rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape, np.float32)),
                         state)
    encoder = nnx.merge(graphdef, state)
    return heads.Classifier(encoder, heads.Head(encoder.features_dim, 3, dropout=0.3,
                                                rngs=nnx.Rngs(1)))


def test_classifier_features_and_logits(classifier):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 16, 1)), jnp.float16)
    graphdef, state = nnx.split(classifier)

    @jax.jit
    def run(state, x, keys):
        model = nnx.merge(graphdef, state)
        return model.features(x), model(x, dropout_keys=keys), model.encoder(x)

    keys = jax.random.split(jax.random.key(0), 2)
    features, logits, encoded = run(state, x, keys)
    assert features.shape == (2, 48) and features.dtype == jnp.float32
    np.testing.assert_array_equal(features, encoded)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, classifier.head(features, dropout_keys=keys),
                               rtol=1e-5, atol=1e-6)
    assert {p[0] for p, _ in nnx.to_flat_state(nnx.state(classifier, nnx.Param))} == {
        "encoder", "head"}


def test_classifier_refuses_a_head_of_the_wrong_width():
    encoder = nnx.eval_shape(lambda: vit3d.ViT3D(input_shape=(16, 16, 16),
                                                 **vit3d.VIT_SIZES["tiny"], rngs=nnx.Rngs(0)))
    with pytest.raises(Her2jaxError, match="48 features"):
        heads.Classifier(encoder, heads.Head(32, 3, rngs=nnx.Rngs(0)))


def test_roi_pool_averages_voxel_features_inside_the_mask_and_on_its_rim():
    from her2jax.models import roi_pool

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 8, 3)).astype(np.float32)
    mask = np.zeros((2, 8, 8, 8), np.float32)
    mask[0, 3:5, 3:5, 3:5] = 1
    mask[1, 2:6, 2:6, 2:6] = 1
    x[..., 1] = mask
    pool = roi_pool.RoiPool(in_channels=3, mask_channel=1, hidden=4, rim_voxels=1,
                            rngs=nnx.Rngs(0))
    out = np.asarray(pool(jnp.asarray(x)))
    assert out.shape == (2, pool.features_dim) == (2, 13)
    # By hand: the same voxel MLP, masked means, the one-voxel cube shell, the log volume.
    v = np.asarray(pool.fc2(jax.nn.gelu(pool.fc1(jnp.asarray(x)), approximate=False)))
    for b in range(2):
        inside = mask[b] > 0
        grown = np.zeros_like(inside)
        idx = np.argwhere(inside)
        lo, hi = idx.min(0) - 1, idx.max(0) + 2
        grown[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
        shell = grown & ~inside
        np.testing.assert_allclose(out[b, :4], v[b][inside].mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out[b, 4:8], v[b][inside].std(0), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(out[b, 8:12], v[b][shell].mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out[b, 12], np.log(inside.mean()), rtol=1e-4)
    with pytest.raises(Her2jaxError, match="mask channel"):
        roi_pool.RoiPool(in_channels=3, mask_channel=3, rngs=nnx.Rngs(0))


def test_the_roi_branch_joins_the_classifier_and_needs_a_mask_channel():
    import ml_collections

    from her2jax.data import recipes
    from her2jax.models import factory
    from her2jax.train import optim

    config = ml_collections.ConfigDict(dict(data=recipes.data_config("kinetic_mm"),
                                            model=factory.model_config("resnet3d")))
    config.data.recipe.shape = (16, 16, 16)
    config.model.resnet.update(depth=10, widen_factor=0.25, shortcut="B",
                               bias_downsample=False)
    config.model.roi_pool.hidden = 4
    model = factory.build_model(config)
    assert model.roi.mask_channel == 2 and model.head.in_features == 128 + 13
    logits = model(jnp.zeros((2, 16, 16, 16, 3)))
    assert logits.shape == (2, 3)
    ids = optim.layer_ids(nnx.state(model, nnx.Param))
    assert {int(i) for i in jax.tree.leaves(ids["roi"])} == {5}   # learns like the head
    config.data.recipe.channels = ("PE", "PEL")
    with pytest.raises(Her2jaxError, match="MASK"):
        factory.build_model(config)
