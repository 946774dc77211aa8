"""FM-BCMRI-compatible 3D Vision Transformer in Flax NNX.

FM-BCMRI's encoder is timm's ``VisionTransformer`` (MoCo v3 flavour) with a ``Conv3d`` patch
embedding and a fixed 3D sin-cos position embedding. This module mirrors its PyTorch module
tree attribute for attribute, so a checkpoint maps onto the NNX state by name:

    PyTorch key (``base_encoder.`` dropped)   NNX state path                       Flax layout
    cls_token               [1, 1, E]         ('cls_token',)                       same
    pos_embed               [1, 1 + N, E]     ('pos_embed',)  PosEmbed, not trained  same
    patch_embed.proj.weight (E, C, p, p, p)   ('patch_embed', 'proj', 'kernel')    (p, p, p, C, E)
    patch_embed.proj.bias                     ('patch_embed', 'proj', 'bias')
    blocks.i.norm1.{weight,bias}              ('blocks', i, 'norm1', 'scale' | 'bias')
    blocks.i.attn.qkv.{weight,bias}           ('blocks', i, 'attn', 'qkv', 'kernel' | 'bias')  W.T
    blocks.i.attn.proj.*                      ('blocks', i, 'attn', 'proj', ...)               W.T
    blocks.i.norm2.*                          ('blocks', i, 'norm2', ...)
    blocks.i.mlp.fc1.*, blocks.i.mlp.fc2.*    ('blocks', i, 'mlp', 'fc1' | 'fc2', ...)         W.T
    norm.{weight,bias}                        ('norm', 'scale' | 'bias')

There is no ``head``: the encoder returns the CLS token of the final norm, [B, E] float32
(what FM-BCMRI's ``forward_features(x)[:, 0]`` extracts). With ``pool='tumour'`` it returns
instead the patch tokens of the final norm averaged inside the tumour and on S nested shells
around it, [B, (1 + S) E], each patch weighted by its share of mask (or shell) voxels: the
recipe's ``MASK`` channel says where the tumour is, so the features need not be found by
attention (a parameter-free readout; the weights, and so ports, are the same for both). With
``spread=True`` the readout also gives the tokens' weighted standard deviation inside the tumour
(as ``RoiPool``'s spread of its voxel features), [B, (2 + S) E]: a mean over the tumour is blind
to how much it varies inside (its heterogeneity, a necrotic core).

Numerics follow PyTorch on purpose:

- Token order: the volume keeps PyTorch's spatial axis order ((N, C, X, Y, Z) there,
  [B, X, Y, Z, C] here) and the conv output [B, X', Y', Z', E] is flattened row-major, the
  order of ``proj(x).flatten(2).transpose(1, 2)``; the position embedding uses the same order.
- LayerNorm (eps 1e-6) uses the two-pass variance like PyTorch, not Flax's default
  E[x²] - E[x]² (which cancels badly when a token's mean is large next to its spread).
- Mixed precision as under ``torch.autocast``: the patch conv, every Linear and attention
  compute in ``dtype``; parameters, LayerNorms, the residual stream and the features stay
  float32 (attention logits and softmax are float32 inside ``dot_product_attention``).
- GELU is the exact (erf) one; attention scale is head_dim ** -0.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from her2jax.errors import Her2jaxError
from her2jax.models import activations, roi_pool

# "small" follows FM-BCMRI's vit_3d_small (12 heads of 32, not timm's 6 of 64).
VIT_SIZES = {
    "tiny": dict(embed_dim=48, depth=2, num_heads=2),
    "small": dict(embed_dim=384, depth=12, num_heads=12),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
POOLS = ("cls", "tumour")
_LN_EPSILON = 1e-6


class PosEmbed(nnx.Variable):
    """The fixed position embedding [1, 1 + N, E]: state, but not an ``nnx.Param``.

    ``nnx.split(model, nnx.Param, ...)`` puts it with the non-trained rest, so optimisers
    and gradients never see it; checkpoints and ports still carry it.
    """


def sincos_pos_embed_3d(grid: tuple[int, int, int], embed_dim: int) -> np.ndarray:
    """FM-BCMRI's fixed 3D sin-cos position embedding, with a zero row for CLS.

    Grid axes are in the order of the patch conv's output, meshed with ``indexing='ij'`` and
    flattened row-major (the token order); with ``pos_dim = E / 6`` and
    ``omega_k = 1 / 10000 ** (k / pos_dim)``, token (h, w, d) gets
    ``[sin(h·ω), cos(h·ω), sin(w·ω), cos(w·ω), sin(d·ω), cos(d·ω)]``.

    Args:
      grid: patch grid (gx, gy, gz), e.g. (6, 6, 6) for 48³ volumes and 8³ patches.
      embed_dim: E, divisible by 6.

    Returns:
      [1 + gx·gy·gz, E] float32; row 0 (CLS) is zero.
    """
    if embed_dim <= 0 or embed_dim % 6:
        raise Her2jaxError(f"embed_dim {embed_dim} is not a positive multiple of 6, which the "
                           "3D sin-cos position embedding needs (sin and cos over 3 axes)",
                           key="embed_dim")
    pos_dim = embed_dim // 6
    # float64, rounded once to float32: PyTorch computes in float32 (differences ~1e-7).
    omega = 1.0 / 10000.0 ** (np.arange(pos_dim, dtype=np.float64) / pos_dim)
    axes = np.meshgrid(*(np.arange(int(g), dtype=np.float64) for g in grid), indexing="ij")
    parts = []
    for coord in axes:
        angles = coord.reshape(-1, 1) * omega[None, :]
        parts += [np.sin(angles), np.cos(angles)]
    table = np.concatenate([np.zeros((1, embed_dim)), np.concatenate(parts, axis=1)])
    return table.astype(np.float32)


def _uniform(limit: float):
    """U(-limit, limit), the form of MoCo v3's / timm's xavier-uniform initialisations."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def _xavier(fan_in: int, fan_out: int):
    return _uniform(math.sqrt(6.0 / (fan_in + fan_out)))


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # float32 like autocast's layer_norm; two-pass variance like PyTorch.
    return nnx.LayerNorm(dim, epsilon=_LN_EPSILON, dtype=jnp.float32, param_dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


class PatchEmbed(nnx.Module):
    """Non-overlapping p³ patches -> tokens: [B, X, Y, Z, C] -> [B, X'·Y'·Z', E] (row-major)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, *, dtype,
                 rngs: nnx.Rngs):
        p = patch_size
        # MoCo v3 initialises the patch projection as a Linear over the flattened patch.
        self.proj = nnx.Conv(in_channels, embed_dim, (p, p, p), strides=(p, p, p),
                             padding="VALID", use_bias=True, dtype=dtype,
                             param_dtype=jnp.float32,
                             kernel_init=_xavier(in_channels * p ** 3, embed_dim), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.proj(x)
        return y.reshape(y.shape[0], -1, y.shape[-1])


class Attention(nnx.Module):
    """timm's multi-head self-attention: one fused ``qkv`` Linear, then ``proj``."""

    def __init__(self, dim: int, num_heads: int, *, attention: str, attention_pad: int,
                 dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.implementation = attention
        self.attention_pad = attention_pad
        # MoCo v3: xavier over each of q, k, v separately (fan_out = dim, not 3·dim).
        self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, param_dtype=jnp.float32,
                              kernel_init=_xavier(dim, dim), rngs=rngs)
        self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=jnp.float32,
                               kernel_init=_xavier(dim, dim), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, e = x.shape
        h = self.num_heads
        # [B, N, 3E] -> [B, N, 3, heads, head_dim]: the layout of timm's qkv.weight rows.
        qkv = self.qkv(x).reshape(b, n, 3, h, e // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        lengths = {}
        padded = -(-n // self.attention_pad) * self.attention_pad if self.attention_pad else n
        if padded != n:
            # cuDNN refuses odd sequence lengths (217); padded keys are masked by length.
            widths = ((0, 0), (0, padded - n), (0, 0), (0, 0))
            q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
            true_length = jnp.full((b,), n, jnp.int32)
            lengths = dict(query_seq_lengths=true_length, key_value_seq_lengths=true_length)
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation,
                                           **lengths)
        return self.proj(out[:, :n].reshape(b, n, e))


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, param_dtype=jnp.float32,
                              kernel_init=_xavier(dim, hidden), rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, param_dtype=jnp.float32,
                              kernel_init=_xavier(hidden, dim), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(activations.gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, attention: str,
                 attention_pad: int, dtype, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(dim, rngs)
        self.attn = Attention(dim, num_heads, attention=attention, attention_pad=attention_pad,
                              dtype=dtype, rngs=rngs)
        self.norm2 = _layer_norm(dim, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # x stays float32; the branches may compute in bfloat16 and are promoted on the add.
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nnx.Module):
    """FM-BCMRI's 3D ViT encoder (ViT-B/8 on 1×48³ by default; see ``VIT_SIZES``).

    Args:
      in_channels: C of the input volumes.
      input_shape: (X, Y, Z) of the input volumes, each divisible by ``patch_size``.
      patch_size: p: kernel and stride of the patch conv.
      embed_dim, depth, num_heads, mlp_ratio: transformer size (E divisible by 6 and by heads).
      attention: ``"xla"`` (any device) or ``"cudnn"`` (NVIDIA GPUs; bfloat16/float16 only).
      attention_pad: > 0 pads the token axis inside attention to a multiple of this, masking
        the padded keys by sequence length (cuDNN needs it: 217 tokens are refused; 64 is a
        good value). The result is the same as without padding.
      dtype: compute dtype (bfloat16 on accelerators); parameters stay float32.
      pool: the features ``__call__`` returns: ``"cls"`` (the CLS token, FM-BCMRI's) or
        ``"tumour"`` (patch tokens averaged inside the mask and on shells around it, see the
        module).
      mask_channel: with ``pool='tumour'``, the index of the tumour mask among the channels.
      rim_voxels: with ``pool='tumour'``, the shells around the mask: their outer edges in
        voxels, one int (one shell) or increasing ints (``roi_pool.shells_of``).
      spread: with ``pool='tumour'``, also the patch tokens' weighted standard deviation inside
        the mask (E more features, after the mean inside it).
      rngs: parameter initialisation.

    Attributes:
      features_dim: the width of the features ``__call__`` returns: E for ``"cls"``,
        (1 + S) E for ``"tumour"`` with S shells, (2 + S) E with ``spread``.
    """

    def __init__(self, *, in_channels: int = 1, input_shape: Sequence[int] = (48, 48, 48),
                 patch_size: int = 8, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, attention: str = "xla",
                 attention_pad: int = 0, dtype=jnp.float32, pool: str = "cls",
                 mask_channel: int | None = None,
                 rim_voxels: int | Sequence[int] = 2, spread: bool = False,
                 rngs: nnx.Rngs):
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != 3 or patch_size <= 0 or any(
                s <= 0 or s % patch_size for s in input_shape):
            raise Her2jaxError(f"input shape {input_shape} is not three sizes divisible by the "
                               f"patch size {patch_size}", key="input_shape")
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise Her2jaxError(f"embed_dim {embed_dim} is not divisible by num_heads "
                               f"{num_heads}", key="num_heads")
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise Her2jaxError(f"unknown attention {attention!r} (expected one of "
                               f"{', '.join(ATTENTION_IMPLEMENTATIONS)})", key="attention")
        if attention == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            raise Her2jaxError(f"cudnn attention computes in bfloat16 or float16, not "
                               f"{jnp.dtype(dtype).name}; use attention='xla' or a half "
                               "precision dtype", key="attention")
        if attention_pad < 0:
            raise Her2jaxError(f"attention_pad {attention_pad} is negative",
                               key="attention_pad")
        if pool not in POOLS:
            raise Her2jaxError(f"unknown pool {pool!r} (expected one of {', '.join(POOLS)})",
                               key="model.vit.pool")
        if pool == "tumour" and (mask_channel is None or not 0 <= mask_channel < in_channels):
            raise Her2jaxError(f"pool 'tumour' needs the mask among the {in_channels} input "
                               f"channels (mask channel {mask_channel})", key="model.vit.pool")
        shells = roi_pool.shells_of(rim_voxels, key="model.vit.rim_voxels")
        if spread and pool != "tumour":
            raise Her2jaxError("spread is a part of the tumour readout: set pool 'tumour' too "
                               f"(pool is {pool!r})", key="model.vit.spread")
        grid = tuple(s // patch_size for s in input_shape)
        pos_embed = sincos_pos_embed_3d(grid, embed_dim)  # checks E % 6 first

        self.in_channels = in_channels
        self.input_shape = input_shape
        self.patch_size = patch_size
        self.grid = grid
        self.embed_dim = embed_dim
        self.pool = pool
        self.mask_channel = mask_channel
        self.shells = shells
        self.spread = bool(spread)
        self.features_dim = embed_dim * (1 + self.spread + len(shells) if pool == "tumour"
                                         else 1)
        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size, dtype=dtype,
                                      rngs=rngs)
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, embed_dim)))
        self.pos_embed = PosEmbed(jnp.asarray(pos_embed[None]))
        self.blocks = nnx.List([
            Block(embed_dim, num_heads, mlp_ratio, attention=attention,
                  attention_pad=attention_pad, dtype=dtype, rngs=rngs)
            for _ in range(depth)])
        self.norm = _layer_norm(embed_dim, rngs)

    def _check_input(self, x: jax.Array) -> None:
        expected = (*self.input_shape, self.in_channels)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise Her2jaxError(f"input volumes have shape {tuple(x.shape)}; this encoder "
                               f"expects [B, {', '.join(map(str, expected))}] "
                               "(B, X, Y, Z, C)", key="input_shape")

    def _encode(self, x: jax.Array) -> jax.Array:
        """[B, X, Y, Z, C] -> the last block's tokens [B, 1 + N, E] float32 (CLS first)."""
        self._check_input(x)
        pos = self.pos_embed[...]
        tokens = self.patch_embed(x).astype(jnp.float32) + pos[:, 1:]
        cls = jnp.broadcast_to(self.cls_token[...] + pos[:, :1],
                               (x.shape[0], 1, self.embed_dim))
        tokens = jnp.concatenate([cls.astype(jnp.float32), tokens], axis=1)
        for i, block in enumerate(self.blocks):
            with jax.named_scope(f"block{i}"):
                tokens = block(tokens)
        return tokens

    def tokens(self, x: jax.Array) -> jax.Array:
        """All tokens after the final norm: [B, 1 + N, E] float32 (CLS, then patches)."""
        return self.norm(self._encode(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Encodes volumes.

        Args:
          x: [B, X, Y, Z, C] volumes, any float dtype.

        Returns:
          [B, E] float32: the CLS token of the final norm; with ``pool='tumour'``,
          [B, (1 + S) E]: the patch tokens' weighted means inside the tumour, then on each
          shell from the inside out ([B, (2 + S) E] with ``spread``: the tokens' weighted
          standard deviation inside the tumour after their mean there).
        """
        if self.pool == "tumour":
            return self._tumour_pool(x, self.norm(self._encode(x)[:, 1:]))
        # LayerNorm is per token: normalising only CLS gives the same features for less.
        return self.norm(self._encode(x)[:, 0])

    def _tumour_pool(self, x: jax.Array, patches: jax.Array) -> jax.Array:
        """Patch tokens [B, N, E] -> [B, (1 + S) E]: means weighted by each patch's share of
        tumour voxels, then of each shell's (``roi_pool.shell_masks``, as ``RoiPool``'s).
        A case whose mask (or shell) is empty gets zeros there. With ``spread``, the weighted
        standard deviation inside the mask follows its mean (two-pass, as the LayerNorms)."""
        mask = jnp.clip(jnp.asarray(x[..., self.mask_channel], jnp.float32), 0.0, 1.0)[..., None]
        weights = [mask, *roi_pool.shell_masks(mask, self.shells)]
        p = self.patch_size

        def patch_share(v):   # [B, X, Y, Z, 1] -> [B, N, 1], row-major as the tokens
            b = v.shape[0]
            gx, gy, gz = self.grid
            v = v.reshape(b, gx, p, gy, p, gz, p)
            return v.mean(axis=(2, 4, 6)).reshape(b, -1, 1)

        def mean(weight, values):
            return jnp.sum(weight * values, axis=1) / (jnp.sum(weight, axis=1) + 1e-6)

        shares = [patch_share(w) for w in weights]
        pooled = [mean(w, patches) for w in shares]
        if self.spread:
            inside = shares[0]
            centred = patches - pooled[0][:, None, :]
            pooled.insert(1, jnp.sqrt(mean(inside, centred * centred) + 1e-6))
        return jnp.concatenate(pooled, axis=-1)
