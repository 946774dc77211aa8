"""MoCo v3's networks around an encoder: the projector and predictor MLPs, and the query and key
(momentum) networks the pretraining step runs.

Following MoCo v3 (Chen, Xie and He, 2021; ``moco/builder.py`` of facebookresearch/moco-v3):

* an MLP layer is ``Linear(bias=False) -> BatchNorm -> ReLU``; the last layer is
  ``Linear(bias=False) -> BatchNorm(no scale, no offset)``;
* the projector has 3 layers for a ViT and 2 for a ResNet, the predictor 2; hidden width
  ``mlp_dim`` (4096), output ``dim`` (256); the ResNet's predictor ends with its Linear
  (``_build_mlp(..., last_bn=False)`` in ``MoCo_ResNet``), the ViT's with the BatchNorm;
* the query network is encoder -> projector -> predictor, the key (momentum) network encoder
  -> projector, its parameters an exponential moving average of the query's, never
  differentiated;
* every BatchNorm averages its batch statistics over the ``data`` mesh axis (MoCo v3's
  SyncBatchNorm) when ``bn_axis_name`` is given.

Parameter layout: :class:`Query` holds ``encoder``, ``projector`` and ``predictor``; :class:`Key`
holds ``encoder`` and ``projector`` with the same paths, so the momentum parameters are the
query's ``encoder`` and ``projector`` entries and the momentum update is one tree map.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch BatchNorm1d defaults (MoCo v3 uses them): eps 1e-5, momentum 0.1 = Flax 0.9.
_BN = dict(momentum=0.9, epsilon=1e-5)


class MLP(nnx.Module):
    """MoCo v3's ``_build_mlp``: ``len(dims) - 1`` layers from ``dims[0]`` to ``dims[-1]``."""

    def __init__(self, dims: Sequence[int], *, last_bn: bool = True, rngs: nnx.Rngs,
                 bn_axis_name: str | None = None):
        dims = tuple(int(d) for d in dims)
        if len(dims) < 2:
            raise ValueError(f"an MLP needs an input and an output width, got {dims}")
        last = len(dims) - 2
        self.linears = nnx.List([nnx.Linear(a, b, use_bias=False, rngs=rngs)
                                 for a, b in zip(dims[:-1], dims[1:], strict=True)])
        self.norms = nnx.List([
            nnx.BatchNorm(b, use_scale=i < last, use_bias=i < last, axis_name=bn_axis_name,
                          rngs=rngs, **_BN)
            for i, b in enumerate(dims[1:]) if i < last or last_bn])
        self.last_bn = last_bn
        self.out_dim = dims[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.linears)
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < n - 1 or self.last_bn:
                x = self.norms[i](x)
            if i < n - 1:
                x = jax.nn.relu(x)
        return x


def projector_dims(kind: str, features: int, mlp_dim: int, dim: int) -> tuple[int, ...]:
    """The projector's widths: 3 layers after a ViT, 2 after a ResNet (MoCo v3)."""
    return (features, mlp_dim, mlp_dim, dim) if kind == "vit3d" else (features, mlp_dim, dim)


def predictor_last_bn(kind: str) -> bool:
    """Whether the predictor ends with a BatchNorm: after a ViT, not after a ResNet (MoCo v3)."""
    return kind == "vit3d"


class Key(nnx.Module):
    """encoder -> projector: the momentum (key) network, and the first part of the query's."""

    def __init__(self, encoder: nnx.Module, projector: MLP):
        self.encoder = encoder
        self.projector = projector

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.projector(self.encoder(x).astype(jnp.float32))


class Query(nnx.Module):
    """encoder -> projector -> predictor: the network the gradient trains."""

    def __init__(self, encoder: nnx.Module, projector: MLP, predictor: MLP):
        self.encoder = encoder
        self.projector = projector
        self.predictor = predictor

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.predictor(self.projector(self.encoder(x).astype(jnp.float32)))

    def features(self, x: jax.Array) -> jax.Array:
        """The encoder's features (what a fine-tuned classifier or pca_lr reads)."""
        return self.encoder(x).astype(jnp.float32)


def momentum_at(step: jax.Array, total: int, base: float) -> jax.Array:
    """MoCo v3's momentum schedule: ``1 - 0.5 (1 + cos(pi t / T)) (1 - m0)``, from ``m0`` at the
    first step to 1 at the last (``t`` = updates done, ``T`` = ``total``)."""
    t = jnp.asarray(step, jnp.float32) / max(int(total), 1)
    return 1.0 - 0.5 * (1.0 + jnp.cos(jnp.pi * t)) * (1.0 - base)


def momentum_update(key_params, query_params, m: jax.Array):
    """``key <- m key + (1 - m) query`` for every momentum parameter (``encoder`` and
    ``projector`` entries of the query's)."""
    return jax.tree.map(lambda k, q: (m * k + (1.0 - m) * q).astype(k.dtype),
                        key_params, type(key_params)({name: query_params[name]
                                                      for name in key_params}))
