"""Activations shared by the encoders and the head."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, ``x * Phi(x)``, as ``jax.nn.gelu(x, approximate=False)`` computes it.

    The derivative ``Phi(x) + x * phi(x)`` is written out rather than left to autodiff: from
    jax 0.12 the derivative of ``erf`` / ``erfc`` evaluates ``exp(-x^2)`` with a
    ``lax.polynomial`` whose coefficients carry no mesh axis, and under
    ``shard_map(check_vma=True)`` (the train step) that fails to trace ("Primitive
    polynomial requires varying manual axes to match"). The forward is jax's own, so
    outputs are unchanged; gradients equal autodiff's up to float rounding.

    Args:
      x: any shape, a float dtype (kept).

    Returns:
      ``gelu(x)``, x's shape and dtype.
    """
    return jax.nn.gelu(x, approximate=False)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    x = jnp.asarray(x)
    cdf = 0.5 * lax.erfc(-x * _SQRT_HALF)
    pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return gelu(x), x_dot * (cdf + x * pdf).astype(x.dtype)
