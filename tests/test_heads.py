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
    assert out.shape == (2, pool.features_dim) == (2, 14)
    # By hand: the same voxel MLP, masked means, the one-voxel cube shell, the log volume and
    # the log volume of the shell.
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
        np.testing.assert_allclose(out[b, 13], np.log(shell.mean()), rtol=1e-4)
    with pytest.raises(Her2jaxError, match="mask channel"):
        roi_pool.RoiPool(in_channels=3, mask_channel=3, rngs=nnx.Rngs(0))


def test_roi_pool_nested_shells():
    from her2jax.models import roi_pool

    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 12, 12, 12, 2)).astype(np.float32)
    x[..., 1] = 0.0
    x[0, 5:7, 4:7, 5:8, 1] = 1.0
    pool = roi_pool.RoiPool(in_channels=2, mask_channel=1, hidden=3, rim_voxels=(1, 3),
                            rngs=nnx.Rngs(0))
    out = np.asarray(pool(jnp.asarray(x)))[0]
    assert pool.shells == (1, 3) and out.shape == (pool.features_dim,) == (4 * 3 + 2,)
    v = np.asarray(pool.fc2(jax.nn.gelu(pool.fc1(jnp.asarray(x)), approximate=False)))[0]

    def cube(grow):   # the mask's box grown by `grow` voxels (a cuboid mask dilates to one)
        out = np.zeros((12, 12, 12), bool)
        out[5 - grow:7 + grow, 4 - grow:7 + grow, 5 - grow:8 + grow] = True
        return out

    near, far = cube(1) & ~cube(0), cube(3) & ~cube(1)
    np.testing.assert_allclose(out[6:9], v[near].mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[9:12], v[far].mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[12:], np.log([cube(0).mean(), near.mean()]), rtol=1e-4)
    for bad in (0, (2, 2), (3, 1), (), "x"):
        with pytest.raises(Her2jaxError, match="rim_voxels"):
            roi_pool.RoiPool(in_channels=2, mask_channel=1, rim_voxels=bad, rngs=nnx.Rngs(0))


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
    assert model.roi.mask_channel == 2 and model.head.in_features == 128 + 14
    logits = model(jnp.zeros((2, 16, 16, 16, 3)))
    assert logits.shape == (2, 3)
    ids = optim.layer_ids(nnx.state(model, nnx.Param))
    assert {int(i) for i in jax.tree.leaves(ids["roi"])} == {5}   # learns like the head
    config.data.recipe.channels = ("PE", "PEL")
    with pytest.raises(Her2jaxError, match="MASK"):
        factory.build_model(config)


def test_standardized_roi_features_have_zero_mean_and_unit_spread_over_the_batch():
    from her2jax.models import roi_pool

    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 8, 8, 8, 2)).astype(np.float32)
    x[..., 1] = 0.0
    for b in range(6):   # tumours of different sizes
        x[b, 2:3 + b // 2, 2:4, 2:5, 1] = 1.0
    plain = roi_pool.RoiPool(in_channels=2, mask_channel=1, hidden=3, rngs=nnx.Rngs(0))
    pool = roi_pool.RoiPool(in_channels=2, mask_channel=1, hidden=3, standardize=True,
                            rngs=nnx.Rngs(0))
    raw = np.asarray(plain(jnp.asarray(x)))
    out = np.asarray(pool(jnp.asarray(x)))      # training mode: this batch's statistics
    np.testing.assert_allclose(out, (raw - raw.mean(0)) / np.sqrt(raw.var(0) + 1e-5),
                               rtol=1e-4, atol=1e-4)
    assert not hasattr(pool.standardize, "scale") or pool.standardize.scale is None
    # eval mode uses the running statistics, updated by the training call above
    pool.eval()
    mean = 0.1 * raw.mean(0)
    var = 0.9 + 0.1 * raw.var(0)
    np.testing.assert_allclose(np.asarray(pool(jnp.asarray(x))),
                               (raw - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)


def test_encoder_none_is_the_tumour_region_branch_alone():
    import ml_collections

    from her2jax.data import recipes
    from her2jax.models import factory
    from her2jax.train import optim

    config = ml_collections.ConfigDict(dict(data=recipes.data_config("kinetic_mm"),
                                            model=factory.model_config("none")))
    config.data.recipe.shape = (8, 8, 8)
    with pytest.raises(Her2jaxError, match="roi_pool.hidden"):
        factory.build_model(config)
    config.model.roi_pool.hidden = 4
    model = factory.build_model(config)
    assert model.encoder is None and model.head.in_features == 14
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 8, 3)), jnp.float32)
    x = x.at[..., 2].set(0.0).at[:, 2:5, 2:5, 2:5, 2].set(1.0)
    np.testing.assert_allclose(model.features(x), model.roi(x), rtol=1e-6)
    assert model(x).shape == (2, 3)
    ids = optim.layer_ids(nnx.state(model, nnx.Param))
    assert {int(i) for i in jax.tree.leaves(ids)} == {1}   # the branch learns like the head
    # pretrained weights for the branch alone come from a --mode=pretrain export of it
    # (test_pretrain); a path that holds none is one line
    config.model.pretrained = "/nowhere"
    with pytest.raises(Her2jaxError, match="not a her2jax-port output"):
        factory.build_model(config)
    with pytest.raises(Her2jaxError, match="encoder or a tumour-region"):
        heads.Classifier(None, heads.Head(4, 3, rngs=nnx.Rngs(0)))
