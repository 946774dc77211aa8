"""Tumour-region pooling: learned voxel features averaged inside the tumour mask and on its rim.

A global average pool over the crop mixes the tumour with whatever surrounds it, so a network
has to learn to divide a sum over the tumour by the tumour's volume — a ratio ReLU layers only
approximate. Radiologists' and the hand-made baseline's quantities are such ratios: mean wash-in
and washout inside the tumour, enhancement of the peritumoral rim, heterogeneity inside it.
``RoiPool`` computes them from learned per-voxel features, with the mask the recipe carries as
a channel (``MASK``):

  v = MLP(x) per voxel (1x1x1: C -> H -> H, GELU)     m = MASK channel, clipped to [0, 1]
  rim = dilate(m, rim_voxels) - m                      (a shell of rim_voxels around the tumour)
  features = [mean_m(v), std_m(v), mean_rim(v), log(mean(m))]     -> 3 H + 1

where ``mean_w(v) = sum(w v) / sum(w)``. The branch sits beside the encoder in the
``Classifier`` (its features are concatenated with the encoder's), so the encoder's parameters
keep their paths (ports, layer-wise decay, freezing) and the head sees both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from her2jax.errors import Her2jaxError
from her2jax.models import activations

_EPS = 1e-6


class RoiPool(nnx.Module):
    """Per-voxel MLP features pooled inside the tumour mask, on its rim, and its volume.

    Args:
      in_channels: C of the input volumes.
      mask_channel: index of the tumour mask among the C channels.
      hidden: H, the width of the voxel features.
      rim_voxels: thickness of the peritumoral shell (voxels of the crop grid).
      rngs: parameter initialisation.

    Attributes:
      features_dim: 3 H + 1.
    """

    def __init__(self, *, in_channels: int, mask_channel: int, hidden: int = 16,
                 rim_voxels: int = 2, rngs: nnx.Rngs):
        if not 0 <= mask_channel < in_channels:
            raise Her2jaxError(f"mask channel {mask_channel} is not one of the {in_channels} "
                               "input channels", key="model.roi_pool")
        if hidden < 1 or rim_voxels < 1:
            raise Her2jaxError(f"hidden ({hidden}) and rim_voxels ({rim_voxels}) must be at "
                               "least 1", key="model.roi_pool")
        self.mask_channel = mask_channel
        self.rim_voxels = rim_voxels
        self.fc1 = nnx.Linear(in_channels, hidden, param_dtype=jnp.float32, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, param_dtype=jnp.float32, rngs=rngs)
        self.features_dim = 3 * hidden + 1

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, D, H, W, C]`` volumes -> ``[B, 3 H + 1]`` float32 pooled features."""
        x = jnp.asarray(x, jnp.float32)
        mask = jnp.clip(x[..., self.mask_channel], 0.0, 1.0)[..., None]     # [B, D, H, W, 1]
        grown = mask
        for _ in range(self.rim_voxels):   # 3x3x3 max filters: a cube-shaped dilation
            grown = nnx.max_pool(grown, (3, 3, 3), strides=(1, 1, 1), padding="SAME")
        rim = jnp.clip(grown - mask, 0.0, 1.0)
        v = self.fc2(activations.gelu(self.fc1(x)))                          # [B, D, H, W, H]

        def mean(weight, values):
            return (jnp.sum(weight * values, axis=(1, 2, 3))
                    / (jnp.sum(weight, axis=(1, 2, 3)) + _EPS))

        inside = mean(mask, v)
        spread = jnp.sqrt(jnp.maximum(mean(mask, v * v) - inside * inside, 0.0) + _EPS)
        volume = jnp.log(jnp.mean(mask, axis=(1, 2, 3)) + _EPS)              # [B, 1]
        return jnp.concatenate([inside, spread, mean(rim, v), volume], axis=-1)
