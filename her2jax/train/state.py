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
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest): the functional view of an NNX model."""
    return nnx.split(model, nnx.Param, ...)


def create(model: nnx.Module, optimizer: optax.GradientTransformation,
           seed: int) -> tuple[nnx.GraphDef, TrainState]:
    """The initial state of ``model`` (its current parameters) and ``optimizer``."""
    graphdef, params, rest = split_model(model)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                       opt_state=optimizer.init(params),
                       rng=jax.random.key_data(jax.random.key(seed)))
    return graphdef, state
