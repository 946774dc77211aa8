"""The training state: everything a checkpoint must hold to continue exactly.

The data position is ``step`` (the input order is a pure function of seed and step), so
the state needs no iterator. Parameters and the rest of the model state (BatchNorm
statistics, the ViT's fixed position embedding) are kept apart so that only parameters are
differentiated and optimised.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """A pytree of arrays (saved and restored by orbax as is).

    Attributes:
      step: int32 scalar, optimisation steps done (= the next global batch to read).
      params: ``nnx.State`` of the model's ``nnx.Param`` s.
      rest: ``nnx.State`` of everything else in the model (BatchStat, PosEmbed, ...).
      opt_state: the optax state of ``params``.
      rng: uint32 [2] raw PRNG key data; per-example keys are
        ``fold_in(fold_in(rng, step), global example index)``.
      ema: an exponential moving average of ``params`` (``train.ema_decay`` > 0), the
        parameters every evaluation uses; None when off (an empty node in checkpoints).
      momentum: MoCo pretraining's key (momentum) network parameters (``pretrain.py``);
        None in every other run.

    Checkpoints of her2jax before 2026-12-05 have neither key; ``checkpoint.py`` restores
    them with both None.
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array
    ema: Any = None
    momentum: Any = None


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest): the functional view of an NNX model."""
    return nnx.split(model, nnx.Param, ...)


def create(model: nnx.Module, optimizer: optax.GradientTransformation,
           seed: int, *, ema: bool = False) -> tuple[nnx.GraphDef, TrainState]:
    """The initial state of ``model`` (its current parameters) and ``optimizer``; with
    ``ema`` the moving average starts at the initial parameters."""
    graphdef, params, rest = split_model(model)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                       opt_state=optimizer.init(params),
                       rng=jax.random.key_data(jax.random.key(seed)),
                       ema=jax.tree.map(jnp.copy, params) if ema else None)
    return graphdef, state


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """The averaging weight of the EMA after ``step`` updates: ``min(decay, (1 + step) /
    (10 + step))``, so the first updates are not buried under the random initialisation
    (with 0.99 the average covers about the last ``step`` / 1.1 updates until step ~890,
    then about the last 100)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def for_inference(state: TrainState) -> TrainState:
    """The state whose ``params`` are the ones to evaluate: the EMA when the run keeps one."""
    return state if state.ema is None else state.replace(params=state.ema)
