"""The data-parallel step: sharded over all devices == one device == plain jax.grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from her2jax.models import heads, resnet3d, vit3d
from her2jax.train import state as state_lib
from her2jax.train import step as step_lib

from .conftest import materialize

AUG = step_lib.Augment(flips=True, scale=0.1, shift=0.1, noise=0.05)
WEIGHTS = jnp.asarray([2.0, 0.5, 1.0])


def mesh_of(n: int):
    return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])


def resnet_model(bn_axis_name="data") -> heads.Classifier:
    def make():
        encoder = resnet3d.ResNet3D(depth=10, in_channels=1, block_inplanes=(4, 4, 8, 8),
                                    shortcut="B", bias_downsample=False, conv1_t_stride=2,
                                    bn_axis_name=bn_axis_name, rngs=nnx.Rngs(0))
        return heads.Classifier(encoder, heads.Head(encoder.features_dim, 3, rngs=nnx.Rngs(1)))

    return materialize(make)


def vit_model() -> heads.Classifier:
    def make():
        encoder = vit3d.ViT3D(in_channels=1, input_shape=(16, 16, 16), patch_size=8,
                              embed_dim=48, depth=2, num_heads=2, rngs=nnx.Rngs(0))
        return heads.Classifier(encoder, heads.Head(48, 3, hidden=16, dropout=0.5,
                                                    rngs=nnx.Rngs(1)))

    return materialize(make)


def batch_of(n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, 16, 16, 16, 1)).astype(np.float16),
            "label": rng.integers(0, 3, n).astype(np.int32),
            "index": rng.permutation(1000)[:n].astype(np.int32),
            "valid": np.array([True] * (n - 1) + [False])}


def on_mesh(tree, mesh, spec):
    return jax.device_put(tree, NamedSharding(mesh, spec))


def sharded_loss_and_grad(model, batch, n_devices):
    mesh = mesh_of(n_devices)
    graphdef, state = state_lib.create(model, optax.sgd(0.1), seed=3)
    fn = step_lib.make_loss_and_grad(graphdef, augment_config=AUG, class_weights=WEIGHTS,
                                     label_smoothing=0.1)
    run = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("data")),
                                out_specs=(P(), P(), P(), P()), check_vma=True))
    loss, grads, rest, _ = run(on_mesh(state, mesh, P()), on_mesh(batch, mesh, P("data")))
    return loss, grads, rest, state


def assert_trees_close(a, b, atol=1e-5, rtol=1e-5):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def test_gradient_and_batchnorm_statistics_do_not_depend_on_the_device_count():
    n = jax.device_count()
    assert n >= 4, "conftest provides several CPU devices"
    batch = batch_of()
    loss_n, grads_n, rest_n, _ = sharded_loss_and_grad(resnet_model(), batch, n)
    loss_1, grads_1, rest_1, state = sharded_loss_and_grad(resnet_model(), batch, 1)
    np.testing.assert_allclose(float(loss_n), float(loss_1), rtol=1e-6)
    assert_trees_close(grads_n, grads_1)
    assert_trees_close(rest_n, rest_1)
    # The statistics really moved (momentum 0.9 from mean 0 / var 1).
    assert not np.allclose(np.asarray(rest_1["encoder"]["bn1"]["mean"][...]), 0.0)


def test_sharded_gradient_equals_plain_jax_grad_on_the_whole_batch():
    """The gradient trap: no extra averaging (an extra pmean would be n times too small,
    a pmean of local gradients n times too large)."""
    batch = batch_of()
    n = jax.device_count()
    loss_n, grads_n, _, state = sharded_loss_and_grad(resnet_model(), batch, n)

    model = resnet_model(bn_axis_name=None)   # no collective: plain single-program reference
    graphdef, params, rest = state_lib.split_model(model)
    keys = step_lib.example_keys(state.rng, state.step, jnp.asarray(batch["index"]))
    x = step_lib.augment(jnp.asarray(batch["image"], jnp.float32),
                         jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys), AUG)
    weights = WEIGHTS[batch["label"]] * batch["valid"]

    def loss_fn(p):
        m = nnx.merge(graphdef, p, rest, copy=True)
        m.train()
        num, den = step_lib.weighted_cross_entropy(m(x), jnp.asarray(batch["label"]),
                                                   weights, 0.1)
        return num / den

    loss_ref, grads_ref = jax.value_and_grad(loss_fn)(params)
    np.testing.assert_allclose(float(loss_n), float(loss_ref), rtol=1e-6)
    assert_trees_close(grads_n, grads_ref)


@pytest.mark.parametrize("make_model", [resnet_model, vit_model], ids=["resnet", "vit_dropout"])
def test_sgd_steps_give_the_same_parameters_on_any_device_count(make_model):
    optimizer = optax.sgd(0.05)
    finals = []
    for n in (jax.device_count(), 1):
        mesh = mesh_of(n)
        graphdef, state = state_lib.create(make_model(), optimizer, seed=5)
        train_step = step_lib.make_train_step(graphdef, optimizer, mesh, num_classes=3,
                                              augment_config=AUG, class_weights=WEIGHTS,
                                              label_smoothing=0.1)
        state = on_mesh(state, mesh, P())
        for s in range(3):
            state, metrics = train_step(state, on_mesh(batch_of(seed=s), mesh, P("data")))
            assert np.isfinite(float(metrics["loss"]))
        assert int(state.step) == 3
        finals.append(jax.device_get(state))
    assert_trees_close(finals[0].params, finals[1].params)
    assert_trees_close(finals[0].rest, finals[1].rest)
    # Training moved the parameters.
    _, start = state_lib.create(make_model(), optimizer, seed=5)
    moved = [not np.allclose(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(start.params), jax.tree.leaves(finals[0].params), strict=True)]
    assert sum(moved) > len(moved) // 2


def test_padding_rows_do_not_count():
    batch = batch_of()
    loss_a, grads_a, _, _ = sharded_loss_and_grad(vit_model(), batch, jax.device_count())
    changed = {k: v.copy() for k, v in batch.items()}
    changed["image"][-1] = 100.0          # the invalid row's content and label are irrelevant
    changed["label"][-1] = (changed["label"][-1] + 1) % 3
    loss_b, grads_b, _, _ = sharded_loss_and_grad(vit_model(), changed, jax.device_count())
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    assert_trees_close(grads_a, grads_b)


def test_weighted_cross_entropy_with_label_smoothing():
    logits = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = jnp.asarray([0, 2])
    weights = jnp.asarray([1.0, 3.0])
    num, den = step_lib.weighted_cross_entropy(logits, labels, weights, 0.3)
    logp = np.log(np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(1, keepdims=True))
    target = np.full((2, 3), 0.1) + 0.7 * np.eye(3)[[0, 2]]
    expected = (-(target * logp).sum(1) * [1.0, 3.0]).sum()
    np.testing.assert_allclose(float(num), expected, rtol=1e-6)
    assert float(den) == 4.0


def test_augmentation_is_keyed_per_example():
    image = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 6, 6, 1)), jnp.float32)
    keys = step_lib.example_keys(jax.random.key_data(jax.random.key(0)), jnp.int32(7),
                                 jnp.arange(4))
    a = step_lib.augment(image, keys, AUG)
    b = step_lib.augment(image[::-1], keys[::-1], AUG)[::-1]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert not np.allclose(np.asarray(a), np.asarray(image))
    np.testing.assert_array_equal(np.asarray(step_lib.augment(image, keys, step_lib.Augment())),
                                  np.asarray(image))
    other = step_lib.example_keys(jax.random.key_data(jax.random.key(0)), jnp.int32(8),
                                  jnp.arange(4))
    assert not np.allclose(np.asarray(step_lib.augment(image, other, AUG)), np.asarray(a))


def test_axis_permutations_and_channel_contrast_are_symmetries_of_the_input():
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=(64, 4, 4, 4, 2)), jnp.float32)
    keys = step_lib.example_keys(jnp.asarray([0, 1], jnp.uint32), jnp.int32(3), jnp.arange(64))
    permuted = np.asarray(step_lib.augment(image, keys, step_lib.Augment(permute_axes=True)))
    orders = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
    seen = set()
    for x, y in zip(np.asarray(image), permuted, strict=True):
        # Each output is exactly one transpose of its input: values moved, none changed.
        match = [o for o in orders if np.array_equal(np.transpose(x, (*o, 3)), y)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(orders)      # 64 draws reach all six orders
    scaled = np.asarray(step_lib.augment(image, keys, step_lib.Augment(channel_scale=0.25)))
    ratio = scaled / np.asarray(image)
    per_channel = ratio.reshape(64, -1, 2)
    # One factor per example and channel, within 1 +- 0.25, different between the channels.
    np.testing.assert_allclose(per_channel, np.broadcast_to(per_channel[:, :1], per_channel.shape),
                               rtol=1e-5)
    factors = per_channel[:, 0]
    assert np.all(np.abs(factors - 1) <= 0.25 + 1e-6)
    assert np.mean(np.abs(factors[:, 0] - factors[:, 1])) > 0.05
    with pytest.raises(ValueError, match="cubic"):
        step_lib.augment(image[:, :, :, :2], keys, step_lib.Augment(permute_axes=True))


def test_intensity_augmentation_leaves_the_mask_channel_to_the_geometry():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(8, 4, 4, 4, 3)).astype(np.float32)
    image[..., 2] = rng.random((8, 4, 4, 4)) > 0.5          # the MASK channel
    keys = step_lib.example_keys(jnp.asarray([0, 5], jnp.uint32), jnp.int32(2), jnp.arange(8))
    settings = dict(flips=True, permute_axes=True, scale=0.2, channel_scale=0.3, shift=0.1,
                    noise=0.05)
    geometry = np.asarray(step_lib.augment(jnp.asarray(image), keys, step_lib.Augment(
        flips=True, permute_axes=True)))
    config = step_lib.Augment.from_config(ml_collections.ConfigDict(settings),
                                          channels=("PE", "PEL", "mask"))
    assert config.mask_channels == (2,)
    out = np.asarray(step_lib.augment(jnp.asarray(image), keys, config))
    # The mask moves with the volume (same flips and permutation) and keeps its 0 / 1 values;
    # the enhancement channels are moved and then rescaled, shifted and noised.
    np.testing.assert_array_equal(out[..., 2], geometry[..., 2])
    assert not np.allclose(out[..., :2], geometry[..., :2], atol=1e-3)
    unmasked = np.asarray(step_lib.augment(jnp.asarray(image), keys,
                                           step_lib.Augment(**settings)))
    np.testing.assert_allclose(unmasked[..., :2], out[..., :2], rtol=1e-6)
    assert not np.array_equal(unmasked[..., 2], geometry[..., 2])


def test_the_parameter_ema_follows_the_updates_with_its_warm_up():
    """state.ema after each step == e + (1 - d_t) (p_t - e), d_t = min(decay, (1+t)/(10+t)),
    from the initial parameters; with gradient accumulation it moves on update steps only."""
    decay = 0.9
    for accum in (1, 2):
        optimizer = optax.sgd(0.5) if accum == 1 else optax.MultiSteps(optax.sgd(0.5), accum)
        mesh = mesh_of(jax.device_count())
        graphdef, state = state_lib.create(vit_model(), optimizer, seed=5, ema=True)
        expected = jax.device_get(state.params)
        assert_trees_close(state.ema, expected, atol=0, rtol=0)
        train_step = step_lib.make_train_step(graphdef, optimizer, mesh, num_classes=3,
                                              augment_config=AUG, ema_decay=decay,
                                              grad_accum=accum)
        state = on_mesh(state, mesh, P())
        for s in range(4):
            before = jax.device_get(state.ema)
            state, _ = train_step(state, on_mesh(batch_of(seed=s), mesh, P("data")))
            params = jax.device_get(state.params)
            if (s + 1) % accum:
                assert_trees_close(state.ema, before, atol=0, rtol=0)
                continue
            t = (s + 1) // accum
            d = min(decay, (1 + t) / (10 + t))
            expected = jax.tree.map(lambda e, p, d=d: e + (1 - d) * (p - e), expected, params)
            assert_trees_close(state.ema, expected, atol=1e-6, rtol=1e-5)
        # The average lags behind the parameters it follows.
        assert not all(np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(
            jax.tree.leaves(state.ema), jax.tree.leaves(state.params), strict=True))
    assert float(state_lib.ema_decay_at(0.99, 0)) == pytest.approx(0.1)
    assert float(state_lib.ema_decay_at(0.99, 10_000)) == pytest.approx(0.99)
