"""The optax optimizer the config's ``train`` section describes.

One transformation does everything between the gradient and the parameter update:

    grads (all Params)
      └─ partition by ``param_groups``:  'frozen' -> set_to_zero (no state at all)
                                          'train'  -> [MultiSteps (grad_accum > 1)]
                                                        └─ [clip_by_global_norm (grad_clip > 0)]
                                                        └─ adamw | [decay] + sgd, each
                                                             parameter at lr(step) * its
                                                             layer's scale

Conventions a reader of the training loop should know:

- **Layer ids** (``layer_ids``). ViT3D: ``patch_embed`` and ``cls_token`` -> 0, ``blocks[i]``
  -> i + 1, the final ``norm`` and the head -> depth + 1 = ``num_layers``. ResNet3D:
  ``conv1`` / ``bn1`` -> 0, ``layerN`` -> N, the head -> 5 = ``num_layers``.
- **Layer-wise learning-rate decay** (BEiT / MAE): layer ``l`` learns at
  ``lr(step) * layer_decay ** (num_layers - l)``; the head gets the full rate. AdamW's
  decoupled weight decay is multiplied by the same per-layer rate (as with PyTorch parameter
  groups). One optimizer serves every layer: its last stage multiplies each parameter's update
  by ``-(lr(step) * scale)``, the very float operations of optax's ``scale_by_learning_rate``
  for a group with the schedule ``lambda step: lr(step) * scale``, so the result is bitwise
  that of one group per scale (``tests/test_optim.py``). One group per scale through
  ``optax.partition`` gives the same numbers, but its state repeats the whole parameter tree
  (masked) in every group: ~11,800 pytree nodes for ViT-B/8 against ~850, which ``jit``
  flattens and rebuilds in Python at every step (~40 ms of host time per step on the 2-core
  CI machine, more than a GPU step takes; BENCHMARKS.md).
- **Weight decay** touches kernels only (``ndim >= 2``), never biases, norm scales / biases or
  the ``cls_token`` (3-D, excluded by name). AdamW: decoupled (optax ``adamw``); SGD: coupled L2
  added to the gradient before momentum (PyTorch ``SGD(weight_decay=...)``).
- **Freezing** (``param_groups``): frozen parameters get exactly zero updates and no optimizer
  state, no gradient-accumulation buffer, and do not count in the clipping norm (a linear
  probe's clip threshold applies to the head's gradient alone). BatchNorm statistics are not
  ``nnx.Param`` s (they live in ``TrainState.rest``): freezing parameters does *not* freeze
  them; whether BatchNorm runs in training or evaluation mode is the training step's choice.
- **Gradient accumulation** (``grad_accum = A > 1``): ``optax.MultiSteps`` averages A
  consecutive gradients and applies one update on the A-th call (zeros in between). The
  schedule's counter lives inside and counts *optimizer updates*, not calls: ``total_steps``
  is in optimizer updates, i.e. number of micro-batches / A.
- Gradient clipping (``grad_clip > 0``) is by global norm, over the trained parameters, on the
  (accumulated, averaged) gradient before any other transformation.
- **Linear probe, then fine-tuning** (``freeze_steps = N > 0``, LP-FT: Kumar et al. 2022,
  "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution"): the
  encoder's updates are zero for the first N optimizer updates, so the head (and a
  tumour-region branch) learns on the pretrained features first; from update N on everything
  trains, at the schedule's rate of that moment. Unlike ``freeze='encoder'``, the held
  encoder's gradients still feed AdamW's moments and the clipping norm during those N updates
  (its moments are warm when it starts); the head's updates are those of a linear probe
  exactly when clipping is off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from her2jax import treepaths
from her2jax.errors import Her2jaxError

OPTIMIZERS = ("adamw", "sgd")
FREEZE_MODES = ("none", "encoder", "last_k")
TRAIN, FROZEN = "train", "frozen"

# Parameters weight decay never touches, whatever their rank.
_NO_DECAY_NAMES = frozenset({"cls_token", "pos_embed"})
_VIT_STEM = frozenset({"patch_embed", "cls_token"})
_RESNET_STEM = frozenset({"conv1", "bn1"})
_RESNET_STAGES = {f"layer{n}": n for n in range(1, 5)}
_RESNET_NUM_LAYERS = 5


# ----------------------------------------------------------------------------------------------
# Config access and validation


def _get(train_config, field: str):
    """``train_config.<field>``; a missing field is a config error naming the key."""
    try:
        return train_config[field]
    except (KeyError, AttributeError) as error:
        raise Her2jaxError("the train section has no such field; add it to the config",
                           key=f"train.{field}") from error


def _check_freeze(train_config) -> tuple[str, int]:
    freeze = _get(train_config, "freeze")
    if freeze not in FREEZE_MODES:
        raise Her2jaxError(f"unknown freeze mode {freeze!r} (expected one of "
                           f"{', '.join(FREEZE_MODES)})", key="train.freeze")
    keep = _get(train_config, "freeze_keep") if freeze == "last_k" else 0
    if int(keep) != keep or keep < 0:
        raise Her2jaxError(f"freeze_keep {keep} is not a non-negative integer (the number of "
                           "last encoder blocks / stages that train)", key="train.freeze_keep")
    return freeze, int(keep)


def _check_schedule(train_config, total_steps: int) -> tuple[float, int]:
    if int(total_steps) != total_steps or total_steps < 1:
        raise Her2jaxError(f"the number of optimizer updates {total_steps} is not a positive "
                           "integer", key="train.total_steps")
    lr = _get(train_config, "learning_rate")
    if not lr >= 0:  # also NaN
        raise Her2jaxError(f"learning_rate {lr} is negative", key="train.learning_rate")
    warmup = _get(train_config, "warmup_steps")
    if int(warmup) != warmup or warmup < 0:
        raise Her2jaxError(f"warmup_steps {warmup} is not a non-negative integer",
                           key="train.warmup_steps")
    if warmup >= total_steps:
        raise Her2jaxError(f"warmup_steps {warmup} is not less than the {total_steps} optimizer "
                           "updates of the run (with grad_accum A, updates = batches / A)",
                           key="train.warmup_steps")
    return float(lr), int(warmup)


def _check_unit_interval(train_config, field: str) -> float:
    value = _get(train_config, field)
    if not 0.0 <= value < 1.0:
        raise Her2jaxError(f"{field} {value} is not in [0, 1)", key=f"train.{field}")
    return float(value)


# ----------------------------------------------------------------------------------------------
# Parameter paths -> layer ids and groups


def _layer_table(params: nnx.State) -> tuple[Callable[[tuple], int], int]:
    """(path keys -> layer id, num_layers) for a Classifier's parameters (ViT3D or ResNet3D)."""
    paths = [treepaths.keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for p in paths:
        if len(p) < 2 or p[0] not in ("encoder", "roi", "head"):
            raise ValueError(f"expected the parameters of a Classifier (paths under 'encoder', "
                             f"'roi' and 'head'), got the path {p}")
    encoder_names = {p[1] for p in paths if p[0] == "encoder"}
    if "blocks" in encoder_names:
        depth = 1 + max(p[2] for p in paths if p[:2] == ("encoder", "blocks"))
        num_layers = depth + 1

        def encoder_id(p: tuple) -> int:
            if p[1] in _VIT_STEM:
                return 0
            if p[1] == "blocks":
                return p[2] + 1
            if p[1] == "norm":
                return num_layers
            raise ValueError(f"no layer id for the ViT parameter {p}")
    elif not encoder_names:  # encoder 'none': the tumour-region branch and the head
        num_layers = 1

        def encoder_id(p: tuple) -> int:
            raise ValueError(f"no encoder, yet the parameter {p}")
    elif encoder_names & set(_RESNET_STAGES):
        num_layers = _RESNET_NUM_LAYERS

        def encoder_id(p: tuple) -> int:
            if p[1] in _RESNET_STEM:
                return 0
            if p[1] in _RESNET_STAGES:
                return _RESNET_STAGES[p[1]]
            raise ValueError(f"no layer id for the ResNet parameter {p}")
    else:
        raise ValueError(f"unknown encoder with parameters {sorted(encoder_names)} "
                         "(expected a ViT3D or a ResNet3D)")

    def layer_id(p: tuple) -> int:
        # The tumour-region branch is new on top of any encoder: it learns like the head.
        return encoder_id(p) if p[0] == "encoder" else num_layers

    return layer_id, num_layers


def _map_paths(fn: Callable[[tuple, Any], Any], params: nnx.State):
    """``fn(path keys, leaf)`` over ``params``, keeping its structure (Param nodes included)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(treepaths.keys(p), x), params)


def layer_ids(params: nnx.State):
    """The layer of every parameter, for layer-wise decay and ``last_k`` freezing.

    Args:
      params: a Classifier's ``nnx.Param`` state (arrays or ``jax.ShapeDtypeStruct`` s); the
        encoder is a ViT3D or a ResNet3D.

    Returns:
      A pytree of int of the same structure as ``params``. ViT3D: ``patch_embed`` and
      ``cls_token`` 0, ``blocks[i]`` i + 1, ``norm`` and the head depth + 1. ResNet3D:
      ``conv1`` / ``bn1`` 0, ``layerN`` N, the head 5. The head's id is ``num_layers``.
    """
    layer_id, _ = _layer_table(params)
    return _map_paths(lambda p, _: layer_id(p), params)


def param_groups(params: nnx.State, train_config):
    """Which parameters train and which are frozen, from ``train.freeze`` / ``freeze_keep``.

    ``'none'``: everything trains. ``'encoder'``: the encoder is frozen, the head (and a
    tumour-region branch beside the encoder, if any) trains (linear probe).
    ``'last_k'``: the head, the ViT's final norm and the last k ViT blocks / ResNet stages
    train, i.e. every parameter with layer id >= ``num_layers - k`` (so k = depth + 1 for a
    ViT, or 5 for a ResNet, also trains the stem: everything). BatchNorm statistics are not
    parameters and are not affected (see the module docstring).

    Args:
      params: a Classifier's ``nnx.Param`` state.
      train_config: the config's ``train`` section.

    Returns:
      A pytree of str, ``'train'`` or ``'frozen'``, of the same structure as ``params``.
    """
    freeze, keep = _check_freeze(train_config)
    if freeze != "none" and "encoder" not in params:
        raise Her2jaxError(f"freeze {freeze!r} freezes encoder layers, but the model has no "
                           "encoder (model.encoder='none'): nothing would be frozen; use "
                           "freeze='none'", key="train.freeze")
    layer_id, num_layers = _layer_table(params)

    def group(p: tuple, _) -> str:
        if freeze == "encoder":
            return FROZEN if p[0] == "encoder" else TRAIN
        if freeze == "last_k":
            return TRAIN if layer_id(p) >= num_layers - keep else FROZEN
        return TRAIN

    return _map_paths(group, params)


def weight_decay_mask(params: nnx.State):
    """True for the parameters weight decay applies to: kernels (ndim >= 2), not cls_token."""
    return _map_paths(lambda p, x: len(x.shape) >= 2 and p[-1] not in _NO_DECAY_NAMES, params)


# ----------------------------------------------------------------------------------------------
# Schedule and optimizer


def learning_rate_schedule(train_config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to 0.

    Args:
      train_config: the config's ``train`` section (``learning_rate``, ``warmup_steps``).
      total_steps: optimizer updates in the run (> ``warmup_steps``); the rate is 0 there and
        stays 0 after.

    Returns:
      ``step -> float32 learning rate``; step counts optimizer updates.
    """
    lr, warmup = _check_schedule(train_config, total_steps)
    if warmup == 0:
        return optax.cosine_decay_schedule(lr, decay_steps=total_steps, alpha=0.0)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup,
                                              decay_steps=total_steps, end_value=0.0)


def scale_by_layer_learning_rate(schedule: optax.Schedule,
                                 scales) -> optax.GradientTransformation:
    """Multiplies each update by ``-(schedule(count) * scale)``, its leaf's scale from ``scales``.

    The same float operations as ``optax.scale_by_learning_rate(lambda step: schedule(step) *
    scale)`` applied to the leaves of one scale (its state too: one update counter), for every
    scale at once.

    Args:
      schedule: ``count -> learning rate``.
      scales: a pytree of Python floats with the structure of the updates.
    """

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        lr = schedule(state.count)
        # One scalar per distinct scale (a Python float, as in ``lambda step: lr * scale``).
        steps = {scale: -1 * (lr * scale) for scale in set(jax.tree.leaves(scales))}
        # ``scales`` leads: where an outer partition masked a parameter out, its update is
        # an (empty) MaskedNode and stays one.
        updates = jax.tree.map(
            lambda scale, g: g if isinstance(g, optax.MaskedNode)
            else jnp.array(steps[scale], dtype=g.dtype) * g, scales, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def _base_optimizer(train_config, schedule: optax.Schedule, decay_mask,
                    lr_scales=None) -> optax.GradientTransformation:
    """AdamW or SGD at ``schedule``, times ``lr_scales`` per parameter when given.

    Without ``lr_scales`` it is ``optax.adamw`` / ``optax.sgd``; with them, the same chain
    with ``scale_by_learning_rate`` replaced by :func:`scale_by_layer_learning_rate`.
    """
    name = _get(train_config, "optimizer")
    weight_decay = float(_get(train_config, "weight_decay"))
    if name == "adamw":
        b1 = _check_unit_interval(train_config, "b1")
        b2 = _check_unit_interval(train_config, "b2")
        if lr_scales is None:
            return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                               mask=decay_mask)
        # optax.adamw's own chain (its defaults eps=1e-8, eps_root=0), per-leaf learning rate.
        return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8, eps_root=0.0),
                           optax.add_decayed_weights(weight_decay, decay_mask),
                           scale_by_layer_learning_rate(schedule, lr_scales))
    momentum = _check_unit_interval(train_config, "momentum")
    nesterov = bool(_get(train_config, "nesterov"))
    if nesterov and momentum == 0.0:
        raise Her2jaxError("Nesterov SGD needs a momentum > 0", key="train.nesterov")
    # momentum 0: no trace state (optax keeps a buffer for momentum=0.0, none for None).
    if lr_scales is None:
        sgd = optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov)
    else:
        # optax.sgd's own chain, per-leaf learning rate.
        sgd = optax.chain(optax.trace(decay=momentum, nesterov=nesterov) if momentum
                          else optax.identity(),
                          scale_by_layer_learning_rate(schedule, lr_scales))
    if weight_decay == 0.0:
        return sgd
    return optax.chain(optax.masked(optax.add_decayed_weights(weight_decay), decay_mask), sgd)


def hold_until(steps: int, held) -> optax.GradientTransformation:
    """Zeroes the updates of the ``held`` leaves for the first ``steps`` calls (optimizer
    updates), passes them on after; other leaves always pass.

    Args:
      steps: how many updates the held leaves sit out.
      held: a pytree of bools with the structure of the updates (True: held).
    """

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        gate = (state.count >= steps).astype(jnp.float32)
        updates = jax.tree.map(
            lambda h, g: g if isinstance(g, optax.MaskedNode) or not h
            else gate.astype(g.dtype) * g, held, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def _check_freeze_steps(train_config, params, total_steps: int) -> int:
    steps = train_config.get("freeze_steps", 0)
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise Her2jaxError(f"freeze_steps {steps!r} is not a non-negative integer (0 = off)",
                           key="train.freeze_steps")
    steps = int(steps)
    if not steps:
        return 0
    if "encoder" not in params:
        raise Her2jaxError("freeze_steps holds the encoder for a linear probe first, but the "
                           "model has no encoder (model.encoder='none')",
                           key="train.freeze_steps")
    if _get(train_config, "freeze") != "none":
        raise Her2jaxError(f"freeze_steps needs freeze='none' (it unfreezes the encoder after "
                           f"{steps} updates; freeze={_get(train_config, 'freeze')!r} keeps "
                           "it frozen)", key="train.freeze_steps")
    if steps >= total_steps:
        raise Her2jaxError(f"freeze_steps {steps} leaves no update of the {total_steps} for "
                           "fine-tuning; use freeze='encoder' for a linear probe",
                           key="train.freeze_steps")
    return steps


def _check_optimizer(train_config) -> None:
    name = _get(train_config, "optimizer")
    if name not in OPTIMIZERS:
        raise Her2jaxError(f"unknown optimizer {name!r} (expected one of "
                           f"{', '.join(OPTIMIZERS)})", key="train.optimizer")
    weight_decay = _get(train_config, "weight_decay")
    if not weight_decay >= 0:
        raise Her2jaxError(f"weight_decay {weight_decay} is negative", key="train.weight_decay")
    layer_decay = _get(train_config, "layer_decay")
    if not 0.0 < layer_decay <= 1.0:
        raise Her2jaxError(f"layer_decay {layer_decay} is not in (0, 1] (1 = off)",
                           key="train.layer_decay")
    accum = _get(train_config, "grad_accum")
    if int(accum) != accum or accum < 1:
        raise Her2jaxError(f"grad_accum {accum} is not a positive integer (1 = off)",
                           key="train.grad_accum")
    clip = _get(train_config, "grad_clip")
    if not clip >= 0:
        raise Her2jaxError(f"grad_clip {clip} is negative (0 = off)", key="train.grad_clip")


def make_optimizer(train_config, params: nnx.State, *,
                   total_steps: int) -> optax.GradientTransformation:
    """The optimizer of ``train_config`` for ``params`` (see the module docstring).

    Args:
      train_config: the config's ``train`` section.
      params: the model's ``nnx.Param`` state (arrays or ``jax.ShapeDtypeStruct`` s): only
        its structure, paths and ranks are read, to build the static groups and masks.
      total_steps: optimizer updates in the run (micro-batches / ``grad_accum``).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params`` (weight decay).
      Its state holds nothing for frozen parameters.

    Raises:
      Her2jaxError: a bad ``train`` field (the error names ``train.<field>``).
    """
    _check_optimizer(train_config)
    schedule = learning_rate_schedule(train_config, total_steps)
    groups = param_groups(params, train_config)
    layer_id, num_layers = _layer_table(params)
    decay_mask = weight_decay_mask(params)

    layer_decay = float(_get(train_config, "layer_decay"))
    if layer_decay == 1.0:
        trained = _base_optimizer(train_config, schedule, decay_mask)
    else:
        # Frozen parameters get a scale too (the tree must match the updates'); the outer
        # partition has masked them out, so nothing is computed or kept for them.
        scales = _map_paths(lambda p, _: layer_decay ** (num_layers - layer_id(p)), params)
        trained = _base_optimizer(train_config, schedule, decay_mask, lr_scales=scales)
    hold = _check_freeze_steps(train_config, params, total_steps)
    if hold:
        trained = optax.chain(trained, hold_until(
            hold, _map_paths(lambda p, _: p[0] == "encoder", params)))

    return _clipped_accumulated_partitioned(train_config, trained, groups)


def _clipped_accumulated_partitioned(train_config, trained: optax.GradientTransformation,
                                     groups) -> optax.GradientTransformation:
    """``trained`` after global-norm clipping, over ``grad_accum`` batches, for the TRAIN
    group; FROZEN parameters get no update (and no optimizer state)."""
    clip = float(_get(train_config, "grad_clip"))
    if clip > 0:
        trained = optax.chain(optax.clip_by_global_norm(clip), trained)
    accum = int(_get(train_config, "grad_accum"))
    if accum > 1:
        trained = optax.MultiSteps(trained, every_k_schedule=accum).gradient_transformation()
    return optax.partition({TRAIN: trained, FROZEN: optax.set_to_zero()}, groups)


def make_plain_optimizer(train_config, params, *, total_steps: int,
                         frozen: Callable[[tuple], bool] | None = None
                         ) -> optax.GradientTransformation:
    """The optimizer of ``train_config`` for any network's parameters (e.g. MoCo's query
    network): the schedule, weight decay on kernels, clipping and accumulation of
    :func:`make_optimizer`, without its Classifier-specific layer-wise decay and freeze
    modes (``train.layer_decay`` and ``train.freeze`` are not read). ``frozen(path keys)``
    marks parameters that get no update."""
    _check_optimizer(train_config)
    schedule = learning_rate_schedule(train_config, total_steps)
    trained = _base_optimizer(train_config, schedule, weight_decay_mask(params))
    groups = _map_paths(lambda p, _: FROZEN if frozen is not None and frozen(p) else TRAIN,
                        params)
    return _clipped_accumulated_partitioned(train_config, trained, groups)
