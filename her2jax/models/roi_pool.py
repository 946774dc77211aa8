"""Tumour-region pooling: learned voxel features averaged inside the tumour mask and on its rim.

A global average pool over the crop mixes the tumour with whatever surrounds it, so a network
has to learn to divide a sum over the tumour by the tumour's volume — a ratio ReLU layers only
approximate. Radiologists' and the hand-made baseline's quantities are such ratios: mean wash-in
and washout inside the tumour, enhancement of the peritumoral rim, heterogeneity inside it.
``RoiPool`` computes them from learned per-voxel features, with the mask the recipe carries as
a channel (``MASK``):

  v = MLP(x) per voxel (1x1x1: C -> H -> H, GELU)     m = MASK channel, clipped to [0, 1]
  shell_s = dilate(m, e_s) - dilate(m, e_{s-1})      (S nested shells, outer edges e_s voxels)
  features = [mean_m(v), std_m(v), mean_shell_1(v) .. mean_shell_S(v),
              log(mean(m)), log(mean(shell_1))]                   -> (2 + S) H + 2
  (optionally standardised: BatchNorm without scale or offset, as StandardScaler in front of
  the baseline's logistic regression)

where ``mean_w(v) = sum(w v) / sum(w)``. The two volumes give the tumour's size and, together, its
surface per volume (an irregular margin has more surface than a round one). Several shells let
the head compare the near and the far surroundings (the extent of peritumoral oedema). The
branch sits beside the encoder in the ``Classifier`` (its features are concatenated with the
encoder's), so the encoder's parameters keep their paths (ports, layer-wise decay, freezing)
and the head sees both; or, with ``model.encoder='none'``, it alone feeds the head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from her2jax.errors import Her2jaxError
from her2jax.models import activations

_EPS = 1e-6


def shells_of(rim_voxels, key: str = "model.roi_pool.rim_voxels") -> tuple[int, ...]:
    """``rim_voxels`` (an int, or increasing ints) -> the outer edges of the shells, in voxels.

    ``2`` is one shell of 2 voxels; ``(2, 5)`` two shells, 0-2 and 2-5 voxels outside the mask.
    ``key`` names the setting in the error a bad value raises.
    """
    edges = (rim_voxels,) if isinstance(rim_voxels, int) else tuple(rim_voxels)
    try:
        edges = tuple(int(e) for e in edges)
    except (TypeError, ValueError):
        edges = ()
    if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise Her2jaxError(f"rim_voxels {rim_voxels!r} must be a positive number of voxels or "
                           "increasing ones, e.g. 2 or (2, 5)", key=key)
    return edges


def shell_masks(mask: jax.Array, edges: tuple[int, ...]) -> list[jax.Array]:
    """``[B, D, H, W, 1]`` mask in [0, 1] -> one weight volume per shell, from the inside out:
    the mask grown by 3x3x3 maximum filters (cube-shaped dilations) to each outer edge in
    ``edges`` (:func:`shells_of`), less the mask grown to the edge inside it."""
    shells, inner, grown = [], mask, mask
    for k in range(edges[-1]):
        grown = nnx.max_pool(grown, (3, 3, 3), strides=(1, 1, 1), padding="SAME")
        if k + 1 in edges:
            shells.append(jnp.clip(grown - inner, 0.0, 1.0))
            inner = grown
    return shells


class RoiPool(nnx.Module):
    """Per-voxel MLP features pooled inside the tumour mask and on shells around it, with the
    tumour's volume and surface.

    Args:
      in_channels: C of the input volumes.
      mask_channel: index of the tumour mask among the C channels.
      hidden: H, the width of the voxel features.
      rim_voxels: the peritumoral shells' outer edges in voxels of the crop grid (see
        :func:`shells_of`): one int for one shell, increasing ints for S nested shells.
      standardize: standardise the pooled features over the batch (running statistics in
        eval mode).
      bn_axis_name: mesh axis the standardisation's batch statistics are averaged over.
      rngs: parameter initialisation.

    Attributes:
      features_dim: (2 + S) H + 2.
    """

    def __init__(self, *, in_channels: int, mask_channel: int, hidden: int = 16,
                 rim_voxels: int | tuple[int, ...] = 2, standardize: bool = False,
                 bn_axis_name: str | None = None, rngs: nnx.Rngs):
        if not 0 <= mask_channel < in_channels:
            raise Her2jaxError(f"mask channel {mask_channel} is not one of the {in_channels} "
                               "input channels", key="model.roi_pool")
        if hidden < 1:
            raise Her2jaxError(f"hidden ({hidden}) must be at least 1", key="model.roi_pool")
        self.mask_channel = mask_channel
        self.shells = shells_of(rim_voxels)
        self.fc1 = nnx.Linear(in_channels, hidden, param_dtype=jnp.float32, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, param_dtype=jnp.float32, rngs=rngs)
        self.features_dim = (2 + len(self.shells)) * hidden + 2
        # PyTorch's BatchNorm defaults (as the ResNet's); running statistics serve eval.
        self.standardize = (nnx.BatchNorm(self.features_dim, use_scale=False, use_bias=False,
                                          momentum=0.9, epsilon=1e-5, axis_name=bn_axis_name,
                                          rngs=rngs)
                            if standardize else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, D, H, W, C]`` volumes -> ``[B, (2 + S) H + 2]`` float32 pooled features."""
        x = jnp.asarray(x, jnp.float32)
        mask = jnp.clip(x[..., self.mask_channel], 0.0, 1.0)[..., None]     # [B, D, H, W, 1]
        shells = shell_masks(mask, self.shells)
        v = self.fc2(activations.gelu(self.fc1(x)))                          # [B, D, H, W, H]

        def mean(weight, values):
            return (jnp.sum(weight * values, axis=(1, 2, 3))
                    / (jnp.sum(weight, axis=(1, 2, 3)) + _EPS))

        inside = mean(mask, v)
        spread = jnp.sqrt(jnp.maximum(mean(mask, v * v) - inside * inside, 0.0) + _EPS)
        # log volume, and log of the first shell's volume: with it, surface per volume (an
        # irregular margin has more of it than a round one of the same volume).
        volume = jnp.log(jnp.mean(mask, axis=(1, 2, 3)) + _EPS)              # [B, 1]
        surface = jnp.log(jnp.mean(shells[0], axis=(1, 2, 3)) + _EPS)        # [B, 1]
        features = jnp.concatenate([inside, spread, *(mean(w, v) for w in shells), volume,
                                    surface], axis=-1)
        return features if self.standardize is None else self.standardize(features)
