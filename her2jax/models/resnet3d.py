"""MedicalNet / MONAI-compatible 3D ResNets (10 to 200 layers) in Flax NNX.

The module mirrors ``monai.networks.nets.ResNet`` (itself Tencent's Med3D / kenshohara's 3D
ResNet) attribute for attribute, so that a PyTorch state dict maps onto the NNX state by name:

    PyTorch key                        NNX state path
    conv1.weight                       ('conv1', 'kernel')
    bn1.{weight,bias}                  ('bn1', 'scale'), ('bn1', 'bias')
    bn1.{running_mean,running_var}     ('bn1', 'mean'), ('bn1', 'var')
    layer2.0.conv1.weight              ('layer2', 0, 'conv1', 'kernel')
    layer2.0.downsample.0.{weight,bias}  ('layer2', 0, 'downsample', 0, 'kernel' / 'bias')
    layer2.0.downsample.1.*            ('layer2', 0, 'downsample', 1, ...)

Conv3d weights ``(O, I, kD, kH, kW)`` become Flax kernels ``(kD, kH, kW, I, O)``; volumes are
``[B, D, H, W, C]`` here and ``[B, C, D, H, W]`` in PyTorch. ``fc`` is not built: the model
returns the globally average-pooled features of ``layer4`` and a task head lives elsewhere.

Two PyTorch conventions are kept on purpose and one is not:

- Every convolution is padded explicitly like its ``nn.Conv3d`` (``'SAME'`` pads strided
  convolutions asymmetrically and would shift every feature map by half a voxel); max pooling
  pads with -inf like ``nn.MaxPool3d``.
- Shortcut 'A' (MONAI ``_downsample_basic_block``) concatenates ``out.data`` with zeros, which
  detaches the shortcut from autograd: no gradient flows through the identity path of the
  three downsampling blocks. ``stop_gradient`` reproduces this, so fine-tuning a MedicalNet
  ResNet-18/34 here trains exactly as it does in MONAI.
- BatchNorm's running variance is updated with the *biased* batch variance (Flax), where
  PyTorch uses the unbiased one (factor n / (n - 1), n = B·D·H·W values per channel, summed
  over devices). Normalisation in training and the running means are identical; the running
  variances settle lower by n / (n - 1): nothing in the early stages, 1.6 % in layer4 for a
  batch of eight 48³ crops with MedicalNet's stem (2x2x2 maps, n = 64).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from her2jax.errors import Her2jaxError

# depth -> (block, blocks per stage), as monai.networks.nets.resnet.resnet_params.
RESNET_LAYERS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}

# PyTorch BatchNorm defaults: eps 1e-5, momentum 0.1 (weight of the new batch) = Flax 0.9.
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9

# MONAI initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu"):
# an untruncated normal with variance 2 / fan_out.
_kaiming_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def medicalnet_args(depth: int) -> dict:
    """The shortcut settings the MedicalNet (Med3D) checkpoints were trained with.

    As MONAI's ``get_medicalnet_pretrained_resnet_args``: shortcut 'A' (parameter-free) for
    ResNet-18/34, 'B' (1x1x1 conv + BN, no conv bias) for the others.

    Args:
      depth: one of ``RESNET_LAYERS``.

    Returns:
      ``{"shortcut": "A" | "B", "bias_downsample": bool}``, keyword arguments of ``ResNet3D``.
    """
    _check_depth(depth)
    return {"shortcut": "A" if depth in (18, 34) else "B", "bias_downsample": depth in (18, 34)}


def _check_depth(depth: int) -> None:
    if depth not in RESNET_LAYERS:
        raise Her2jaxError(f"ResNet depth {depth} is not one of {sorted(RESNET_LAYERS)}")


def _conv(in_features, out_features, kernel, *, stride=1, padding=0, dilation=1,
          use_bias=False, dtype, rngs) -> nnx.Conv:
    """An ``nn.Conv3d`` lookalike: cubic ints or triples, symmetric explicit padding."""
    kernel = _triple(kernel)
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=kernel,
        strides=_triple(stride),
        padding=tuple((p, p) for p in _triple(padding)),
        kernel_dilation=_triple(dilation),
        use_bias=use_bias,
        kernel_init=_kaiming_fan_out,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, Sequence) else (v, v, v)


class BasicBlock(nnx.Module):
    """MONAI ``ResNetBlock``: 3x3x3 (stride) -> 3x3x3, identity or projected shortcut (both
    3x3x3 convolutions dilated by ``dilation``, padded by it, as Tencent's ``BasicBlock``)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, *, stride: int, downsample: nnx.List | None,
                 shortcut_a: bool, bn, dtype, rngs: nnx.Rngs, dilation: int = 1):
        self.conv1 = _conv(in_planes, planes, 3, stride=stride, padding=dilation,
                           dilation=dilation, dtype=dtype, rngs=rngs)
        self.bn1 = bn(planes)
        self.conv2 = _conv(planes, planes, 3, padding=dilation, dilation=dilation, dtype=dtype,
                           rngs=rngs)
        self.bn2 = bn(planes)
        self.downsample = downsample
        self.shortcut_a = (stride, planes) if shortcut_a else None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return jax.nn.relu(out + _shortcut(self, x))


class Bottleneck(nnx.Module):
    """MONAI ``ResNetBottleneck``: 1x1x1 -> 3x3x3 (stride, dilation) -> 1x1x1 (x4 channels)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, *, stride: int, downsample: nnx.List | None,
                 shortcut_a: bool, bn, dtype, rngs: nnx.Rngs, dilation: int = 1):
        self.conv1 = _conv(in_planes, planes, 1, dtype=dtype, rngs=rngs)
        self.bn1 = bn(planes)
        self.conv2 = _conv(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation,
                           dtype=dtype, rngs=rngs)
        self.bn2 = bn(planes)
        self.conv3 = _conv(planes, planes * 4, 1, dtype=dtype, rngs=rngs)
        self.bn3 = bn(planes * 4)
        self.downsample = downsample
        self.shortcut_a = (stride, planes * 4) if shortcut_a else None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return jax.nn.relu(out + _shortcut(self, x))


def _shortcut(block: BasicBlock | Bottleneck, x: jax.Array) -> jax.Array:
    """Type B (``downsample`` = [conv, bn]), type A (static (stride, planes)) or identity."""
    if block.downsample is not None:
        conv, bn = block.downsample
        return bn(conv(x))
    if block.shortcut_a is not None:
        stride, planes = block.shortcut_a
        return _downsample_basic_block(x, planes, stride)
    return x


def _downsample_basic_block(x: jax.Array, planes: int, stride: int) -> jax.Array:
    """Shortcut 'A': AvgPool3d(kernel 1, stride) then zero channels up to ``planes``.

    A kernel-1 average pool is a strided slice (output ceil(n / stride), as PyTorch's
    floor((n - 1) / stride) + 1). MONAI concatenates ``out.data``, which cuts the gradient.
    """
    out = x[:, ::stride, ::stride, ::stride, :]
    out = jnp.pad(out, ((0, 0),) * 4 + ((0, planes - out.shape[-1]),))
    return jax.lax.stop_gradient(out)


class ResNet3D(nnx.Module):
    """MONAI ``ResNet`` (spatial_dims=3, ``feed_forward=False``) as a feature encoder.

    MedicalNet weights expect ``conv1_t_stride=2``, ``in_channels=1`` and
    ``**medicalnet_args(depth)`` (and ``dilated=True`` for the features they were trained
    to give); the defaults here are MONAI's ``ResNet`` defaults.

    Attributes:
      features_dim: length of the feature vector, ``int(block_inplanes[-1] * widen_factor)``
        times the block expansion (512 for depth 10/18/34, 2048 for 50+ at widen 1).
    """

    def __init__(
        self,
        *,
        depth: int = 18,
        in_channels: int = 1,
        shortcut: str = "B",
        bias_downsample: bool = True,
        conv1_t_size: int | Sequence[int] = 7,
        conv1_t_stride: int | Sequence[int] = 1,
        no_max_pool: bool = False,
        widen_factor: float = 1.0,
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        dilated: bool = False,
        bn_axis_name: str | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        """Builds the network in training mode (``model.eval()`` switches BatchNorm).

        Args:
          depth: one of ``RESNET_LAYERS`` (10, 18, 34, 50, 101, 152, 200).
          in_channels: input channels C.
          shortcut: 'A' (strided identity + zero channels, no parameters) or 'B' (1x1x1
            conv + BatchNorm) where a block changes shape.
          bias_downsample: whether the type-B shortcut convolution has a bias.
          conv1_t_size: first convolution's kernel size, an int for all three axes or a
            (D, H, W) triple; padding is ``size // 2`` per axis.
          conv1_t_stride: first convolution's stride, an int for all three axes or a triple.
            As MONAI (``ensure_tuple_rep``), not kenshohara's original ``(t, 7, 7)`` /
            ``(t, 2, 2)``: MedicalNet's ``conv1_t_stride=2`` is a 7x7x7 / 2x2x2 stem.
          no_max_pool: skip the 3x3x3 / 2 max pool after the stem.
          widen_factor: scales every stage width, stem included, as MONAI
            (``int(planes * widen_factor)``; bottlenecks widen their inner 3x3x3 too).
          block_inplanes: stage widths before ``widen_factor``.
          dilated: the network MedicalNet's weights were trained in (Tencent's
            ``models/resnet.py``): layers 3 and 4 keep stride 1 and dilate their 3x3x3
            convolutions by 2 and 4, so their maps stay at layer 2's resolution (MONAI's
            ``ResNet``, the default here, strides them by 2 instead). Same parameters, other
            features.
          bn_axis_name: mesh axis over which BatchNorm batch statistics are averaged (e.g.
            'data' under ``shard_map``); None for single-device use. With a name, a
            training-mode call must run inside a ``shard_map`` that binds that axis
            (evaluation mode computes no statistics and runs anywhere).
          dtype: compute dtype (bfloat16 on accelerators); parameters and the returned
            features stay float32.
          rngs: parameter initialisation keys.
        """
        _check_depth(depth)
        if shortcut not in ("A", "B"):
            raise Her2jaxError(f"ResNet shortcut {shortcut!r} is not 'A' or 'B'")
        block_name, layers = RESNET_LAYERS[depth]
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block_name]
        expansion = block_cls.expansion  # block output channels / planes
        widths = [int(w * widen_factor) for w in block_inplanes]

        bn = partial(nnx.BatchNorm, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                     axis_name=bn_axis_name, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.dtype = dtype
        self.no_max_pool = no_max_pool
        self.features_dim = widths[3] * expansion

        stem_kernel = _triple(conv1_t_size)
        self.conv1 = _conv(in_channels, widths[0], stem_kernel, stride=conv1_t_stride,
                           padding=tuple(k // 2 for k in stem_kernel), dtype=dtype, rngs=rngs)
        self.bn1 = bn(widths[0])

        in_planes = widths[0]
        stages = []
        strides, dilations = ((1, 2, 1, 1), (1, 1, 2, 4)) if dilated else ((1, 2, 2, 2),
                                                                           (1, 1, 1, 1))
        for planes, blocks, stride, dilation in zip(widths, layers, strides, dilations,
                                                    strict=True):
            out_planes = planes * expansion
            reshapes = stride != 1 or in_planes != out_planes
            downsample = None
            if reshapes and shortcut == "B":
                downsample = nnx.List([
                    _conv(in_planes, out_planes, 1, stride=stride, use_bias=bias_downsample,
                          dtype=dtype, rngs=rngs),
                    bn(out_planes),
                ])
            block = partial(block_cls, planes=planes, bn=bn, dtype=dtype, rngs=rngs,
                            dilation=dilation)
            stage = [block(in_planes, stride=stride, downsample=downsample,
                           shortcut_a=reshapes and shortcut == "A")]
            in_planes = out_planes
            stage += [block(in_planes, stride=1, downsample=None, shortcut_a=False)
                      for _ in range(1, blocks)]
            stages.append(nnx.List(stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def __call__(self, x: jax.Array) -> jax.Array:
        """Encodes volumes.

        Args:
          x: ``[B, D, H, W, C]`` volumes (any float dtype; cast to the compute dtype).

        Returns:
          ``[B, features_dim]`` float32 features (global average pool of ``layer4``).
        """
        x = jnp.asarray(x, self.dtype)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            # nn.MaxPool3d(3, 2, padding=1): -inf padding, floor division of the size.
            x = nnx.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding=((1, 1),) * 3)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))
