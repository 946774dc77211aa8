"""The task classifier: a head on encoder features, and encoder + head as one model.

Dropout randomness. ``Head`` holds an ``nnx.Dropout`` (active after ``model.train()``, the
default, off after ``model.eval()``) but no random stream of its own — so the model's state
is parameters and statistics only, which is what a checkpoint and a device-count-independent
run want. Keys come one of two ways:

- ``dropout_keys`` (per example, what the training engine passes): a [B] array of keys, one
  per example, e.g. ``vmap(fold_in, (None, 0))(fold_in(key, step), global_example_index)``.
  Each example's mask then depends only on its own key, so the training run is the same
  whatever the number of devices or processes the batch is split over (DESIGN.md).
- ``rngs``: an ``nnx.Rngs`` with a ``dropout`` (or default) stream, advanced on every call:
  fine for eager use and for tests, but the masks then depend on the batch's shape and split.

In train mode with a dropout rate above 0, one of them is required.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from her2jax.errors import Her2jaxError
from her2jax.models import activations


class Head(nnx.Module):
    """Features -> class logits: Dropout -> Linear, or Linear -> GELU -> Dropout -> Linear.

    Args:
      in_features: F, the encoder's feature width.
      num_classes: K.
      hidden: > 0 adds a hidden layer of this width (GELU).
      dropout: dropout rate in [0, 1) before the last Linear.
      rngs: parameter initialisation.
    """

    def __init__(self, in_features: int, num_classes: int, *, hidden: int = 0,
                 dropout: float = 0.0, rngs: nnx.Rngs):
        if in_features <= 0 or num_classes <= 0 or hidden < 0:
            raise Her2jaxError(f"head sizes must be positive (in_features {in_features}, "
                               f"num_classes {num_classes}, hidden {hidden})", key="head")
        if not 0.0 <= dropout < 1.0:
            raise Her2jaxError(f"dropout rate {dropout} is not in [0, 1)", key="dropout")
        self.in_features = in_features
        self.num_classes = num_classes
        self.hidden = (nnx.Linear(in_features, hidden, param_dtype=jnp.float32,
                                  kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
                       if hidden else None)
        self.dropout = nnx.Dropout(dropout)
        # MoCo v3's linear probe initialises its head with N(0, 0.01) and zero bias.
        self.fc = nnx.Linear(hidden or in_features, num_classes, param_dtype=jnp.float32,
                             kernel_init=nnx.initializers.normal(0.01), rngs=rngs)

    def __call__(self, features: jax.Array, *, dropout_keys: jax.Array | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """Class logits.

        Args:
          features: [B, F] any float dtype.
          dropout_keys: optional [B] keys (typed, or raw [B, 2] uint32), one per example.
          rngs: otherwise, a stream for the whole batch's dropout.

        Returns:
          [B, K] float32 logits.
        """
        x = features.astype(jnp.float32)
        if self.hidden is not None:
            x = activations.gelu(self.hidden(x))
        if dropout_keys is None:
            x = self.dropout(x, rngs=rngs)
        else:
            x = jax.vmap(lambda row, key: self.dropout(row, rngs=key))(x, dropout_keys)
        return self.fc(x).astype(jnp.float32)


class Classifier(nnx.Module):
    """An encoder (``[B, D, H, W, C] -> [B, F]``), optionally a tumour-region branch beside
    it (``roi``, e.g. :class:`her2jax.models.roi_pool.RoiPool`, whose features are appended),
    followed by a ``Head``. Either the encoder or ``roi`` may be None, not both."""

    def __init__(self, encoder: nnx.Module | None, head: Head, roi: nnx.Module | None = None):
        if encoder is None and roi is None:
            raise Her2jaxError("a classifier needs an encoder or a tumour-region branch",
                               key="model.encoder")
        width = 0 if encoder is None else getattr(encoder, "features_dim", None)
        if width is not None and roi is not None:
            width += roi.features_dim
        if width is not None and width != head.in_features:
            raise Her2jaxError(f"the encoder gives {width} features but the head expects "
                               f"{head.in_features}", key="head")
        self.encoder = encoder
        self.roi = roi
        self.head = head

    def features(self, x: jax.Array) -> jax.Array:
        """[B, D, H, W, C] volumes -> [B, F] float32 features (encoder, then ``roi``'s)."""
        if self.encoder is None:
            return self.roi(x)
        features = self.encoder(x).astype(jnp.float32)
        if self.roi is None:
            return features
        return jnp.concatenate([features, self.roi(x)], axis=-1)

    def __call__(self, x: jax.Array, *, dropout_keys: jax.Array | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """[B, D, H, W, C] volumes -> [B, K] float32 logits (see ``Head`` for dropout keys)."""
        return self.head(self.features(x), dropout_keys=dropout_keys, rngs=rngs)
