"""Pure, jitted training and evaluation steps.

The train step is per-device code under ``jax.shard_map`` over the mesh axis ``data``
(the pmap programming model), wrapped in ``jax.jit`` with the state donated. Parameters,
optimizer state and BatchNorm statistics are replicated (``P()``); the batch is split over
``data``.

Gradient trap (DESIGN.md, verified): with ``check_vma=True`` the gradient of a replicated
parameter is already summed over the axis, so the step differentiates the *global* loss
(``psum`` of the local weighted sums over ``psum`` of the weights) and does not average
gradients again. ``tests/test_step.py`` compares with a single device.

Randomness is keyed by example, not by device: example ``i`` of step ``s`` uses
``fold_in(fold_in(rng, s), i)`` (augmentation and dropout), so a run is the same on any
number of devices.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from her2jax.errors import Her2jaxError
from her2jax.train import state as state_lib
from her2jax.train.state import TrainState

AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Augment:
    """On-device augmentation (all off by default).

    Attributes:
      flips: flip each spatial axis with probability 1/2.
      permute_axes: reorder the three spatial axes by one of the 6 permutations, uniformly
        (cubic crops only): with the flips, any of the 48 axis-aligned symmetries of a cube.
        For tumours, whose orientation carries no class information, this multiplies the
        views of every case; the canonical axes' anatomical meaning is given up.
      scale: multiply intensities by 1 + U(-scale, scale).
      channel_scale: then multiply each channel by its own 1 + U(-channel_scale,
        channel_scale): contrast between channels changes as it does between scanners and
        timings (an enhancement map sampled 30 s later is a few tens of percent stronger).
      shift: add U(-shift, shift).
      noise: add Gaussian noise of this standard deviation.
      mask_channels: channels that hold a tumour mask (the recipe's ``MASK``): moved by the
        flips and permutations, left alone by scale, channel_scale, shift and noise (a mask
        scaled or noised would change the tumour's volume and the regions pooled over).
    """

    flips: bool = False
    permute_axes: bool = False
    scale: float = 0.0
    channel_scale: float = 0.0
    shift: float = 0.0
    noise: float = 0.0
    mask_channels: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config, channels=()) -> Augment:
        """From ``config.train.augment``, with the recipe's ``channels`` (tokens such as
        'PE', 'MASK') naming the mask channels."""
        return cls(flips=bool(config.flips),
                   permute_axes=bool(config.get("permute_axes", False)),
                   scale=float(config.scale),
                   channel_scale=float(config.get("channel_scale", 0.0)),
                   shift=float(config.shift),
                   noise=float(config.noise),
                   mask_channels=mask_channels(channels))


def mask_channels(channels) -> tuple[int, ...]:
    """The positions of a recipe's ``MASK`` channels among ``channels`` (tokens such as 'PE',
    'MASK'): what intensity augmentations leave alone."""
    return tuple(i for i, c in enumerate(channels) if str(c).strip().upper() == "MASK")


def example_keys(rng: jax.Array, step: jax.Array, index: jax.Array) -> jax.Array:
    """[B] typed keys: ``fold_in(fold_in(rng, step), index[b])``."""
    base = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(index)


def augment(image: jax.Array, keys: jax.Array, config: Augment) -> jax.Array:
    """Randomly flipped, rescaled, shifted and noised volumes.

    Args:
      image: [B, D, H, W, C] float32.
      keys: [B] typed keys, one per example.
      config: what to apply.

    Returns:
      [B, D, H, W, C] float32.
    """

    if config.permute_axes and len(set(image.shape[1:4])) != 1:
        raise ValueError(f"permute_axes needs cubic volumes, got {image.shape[1:4]}")

    def one(x: jax.Array, key: jax.Array) -> jax.Array:
        k_flip, k_scale, k_shift, k_noise = jax.random.split(key, 4)
        if config.permute_axes:
            # An extra stream (fold_in) keeps the other augmentations' draws unchanged.
            choice = jax.random.randint(jax.random.fold_in(key, 1), (), 0, 6)
            orders = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
            x = jax.lax.switch(choice, [lambda v, o=o: jnp.transpose(v, (*o, 3))
                                        for o in orders], x)
        if config.flips:
            flips = jax.random.bernoulli(k_flip, 0.5, (3,))
            for axis in range(3):
                x = jnp.where(flips[axis], jnp.flip(x, axis), x)
        moved = x
        if config.scale:
            x = x * (1 + jax.random.uniform(k_scale, (), minval=-config.scale,
                                            maxval=config.scale))
        if config.channel_scale:
            x = x * (1 + jax.random.uniform(jax.random.fold_in(key, 2), (x.shape[-1],),
                                            minval=-config.channel_scale,
                                            maxval=config.channel_scale))
        if config.shift:
            x = x + jax.random.uniform(k_shift, (), minval=-config.shift, maxval=config.shift)
        if config.noise:
            x = x + config.noise * jax.random.normal(k_noise, x.shape)
        if config.mask_channels:
            is_mask = np.isin(np.arange(x.shape[-1]), config.mask_channels)
            x = jnp.where(is_mask, moved, x)
        return x

    return jax.vmap(one)(image, keys)


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                           label_smoothing: float) -> tuple[jax.Array, jax.Array]:
    """(sum of weight x loss, sum of weights) over a local batch, float32.

    Args:
      logits: [B, K].
      labels: [B] int.
      weights: [B] per-example weights (0 for padding rows).
      label_smoothing: epsilon; the target puts 1 - eps + eps / K on the label.
    """
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.sum(weights * losses), jnp.sum(weights)


def make_loss_and_grad(graphdef: nnx.GraphDef, *, augment_config: Augment,
                       class_weights: jax.Array, label_smoothing: float) -> Callable:
    """Per-device ``(state, batch) -> (loss, grads, new_rest, aux)``; call under shard_map.

    ``loss`` is the global weighted mean; ``grads`` is its gradient (already summed over the
    axis by shard_map's transpose rules: no further averaging); ``new_rest`` holds the
    updated BatchNorm statistics (synchronised when the model's BatchNorm has
    ``axis_name='data'``).
    """

    def loss_and_grad(state: TrainState, batch: dict):
        keys = example_keys(state.rng, state.step, batch["index"])
        aug_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
        drop_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        x = augment(batch["image"].astype(jnp.float32), aug_keys, augment_config)
        weights = class_weights[batch["label"]] * batch["valid"].astype(jnp.float32)
        total_weight = lax.psum(jnp.sum(weights), AXIS)

        def global_loss(params):
            model = nnx.merge(graphdef, params, state.rest, copy=True)
            model.train()
            logits = model(x, dropout_keys=drop_keys)
            local, _ = weighted_cross_entropy(logits, batch["label"], weights, label_smoothing)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return lax.psum(local, AXIS) / total_weight, (rest, logits)

        (loss, (rest, logits)), grads = jax.value_and_grad(global_loss, has_aux=True)(
            state.params)
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * batch["valid"])
        accuracy = lax.psum(correct, AXIS) / lax.psum(jnp.sum(batch["valid"]), AXIS)
        return loss, grads, rest, {"accuracy": accuracy}

    return loss_and_grad


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    mesh: Mesh, *, num_classes: int, augment_config: Augment = Augment(),
                    class_weights: jax.Array | None = None,
                    label_smoothing: float = 0.0, ema_decay: float = 0.0,
                    grad_accum: int = 1) -> Callable:
    """``jit(shard_map(step))``: ``(state, batch) -> (state, metrics)``, state donated.

    Args:
      graphdef: the model's graph definition (from ``state.split_model``).
      optimizer: the optax transformation ``state.opt_state`` belongs to.
      mesh: a mesh with the ``data`` axis.
      num_classes: K.
      augment_config: on-device augmentation.
      class_weights: [K] loss weight per class (None: all 1).
      label_smoothing: label-smoothing epsilon.
      ema_decay: the decay of ``state.ema`` per optimizer update, with
        ``state_lib.ema_decay_at``'s warm-up (used when the state keeps an EMA).
      grad_accum: global batches per optimizer update (``optax.MultiSteps``): the EMA moves
        only on the batches that complete an update.

    The batch is a dict of global arrays sharded over ``data``: image [B, D, H, W, C],
    label [B], index [B] (global example index), valid [B].
    """
    weights = jnp.ones(num_classes) if class_weights is None else jnp.asarray(class_weights)
    loss_and_grad = make_loss_and_grad(graphdef, augment_config=augment_config,
                                       class_weights=weights, label_smoothing=label_smoothing)

    def per_device(state: TrainState, batch: dict):
        loss, grads, rest, aux = loss_and_grad(state, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            updated = (state.step + 1) % grad_accum == 0
            decay = jnp.where(updated, state_lib.ema_decay_at(
                ema_decay, (state.step + 1) // grad_accum), 1.0)
            ema = jax.tree.map(lambda e, p: (e + (1.0 - decay) * (p - e)).astype(e.dtype),
                               ema, params)
        metrics = {"loss": loss, "accuracy": aux["accuracy"],
                   "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, rest=rest,
                             opt_state=opt_state, ema=ema), metrics

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)),
                            out_specs=(P(), P()), check_vma=True)
    return jax.jit(sharded, donate_argnums=0)


FLIP_VIEWS = tuple(tuple(a for a, bit in zip((1, 2, 3), bits, strict=True) if bit)
                   for bits in itertools.product((0, 1), repeat=3))
"""Test-time augmentation's views: the 8 subsets of the spatial axes (1, 2, 3) to flip, the
identity first (the flips the training augmentation draws from)."""


def tta_views(augment_config) -> tuple[tuple[int, ...], ...]:
    """The flips test-time augmentation averages over for a run trained with
    ``augment_config`` (``config.train.augment``): the 8 flips of the volume when training
    flipped it, since the model then learnt them as the same case.

    Raises:
      Her2jaxError: the run trained without flips (a flipped view is then an input the model
        never saw, and averaging over it measures nothing the run learnt).
    """
    if not augment_config.get("flips", False):
        raise Her2jaxError("test-time augmentation averages over the flips the training "
                           "augmentation drew; this run trained without them "
                           "(train.augment.flips=False), so --tta has nothing to average",
                           key="tta")
    return FLIP_VIEWS


def make_predict(graphdef: nnx.GraphDef, views: tuple[tuple[int, ...], ...] = ((),)) -> Callable:
    """jit ``(params, rest, image) -> (probs [B, K], features [B, F])``, float32, eval mode.

    Args:
      graphdef: the model.
      views: test-time augmentation: each entry the spatial axes of ``image`` ([B, D, H, W, C])
        to flip; probabilities and features are the mean over the views (default: the image
        as it is). See :func:`tta_views`.

    Inputs may be global arrays sharded over ``data``; XLA partitions the computation.
    """
    views = tuple(tuple(v) for v in views)
    if not views:
        raise ValueError("make_predict needs at least one view")

    @jax.jit
    def predict(params, rest, image):
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()
        image = image.astype(jnp.float32)
        probs, features = 0.0, 0.0
        for axes in views:
            f = model.features(jnp.flip(image, axes) if axes else image)
            p = jax.nn.softmax(model.head(f).astype(jnp.float32), axis=-1)
            probs, features = probs + p, features + f
        # The mean of the views' probabilities (a proper mixture, as for the fold ensemble).
        return probs / len(views), features / len(views)

    return predict


def make_mesh() -> jax.sharding.Mesh:
    """One ``data`` axis over every device of every process.

    Auto axis types: shardings stay out of the array types (jax >= 0.9 defaults make_mesh to
    Explicit, under which e.g. the ViT's replicated CLS token and a data-sharded batch
    cannot be concatenated); shard_map and jit place the computation.
    """
    return jax.make_mesh((jax.device_count(),), (AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,))
