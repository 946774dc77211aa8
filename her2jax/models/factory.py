"""The model a config describes: encoder (ViT3D or ResNet3D) + task head, optionally with
pretrained encoder weights from a her2jax-port directory (``config.model.pretrained``).

The encoder's input channels and grid come from the data recipe, and the number of classes
from the label scheme, so a model always fits the dataset it is trained on.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from her2jax import labels
from her2jax.errors import Her2jaxError
from her2jax.models import heads, port, resnet3d, roi_pool, vit3d

ENCODERS = ("vit3d", "resnet3d", "none")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_config(encoder: str = "vit3d") -> ml_collections.ConfigDict:
    """The ``model`` section configs start from (FM-BCMRI ViT-B/8, or MedicalNet ResNet-18)."""
    return ml_collections.ConfigDict(dict(
        encoder=encoder,
        # num_heads 0: the size's (VIT_SIZES); a port's heads must agree.
        # pool: the features, 'cls' (FM-BCMRI's CLS token) or 'tumour' (patch tokens averaged
        # inside the recipe's MASK channel and on shells around it whose outer edges are
        # rim_voxels, as roi_pool's; (1 + shells) x wide); spread: the tumour readout also
        # gives the tokens' standard deviation inside the mask ((2 + shells) x wide).
        vit=dict(size="base", patch_size=8, attention="xla", attention_pad=0, num_heads=0,
                 pool="cls", rim_voxels=(2,), spread=False),
        # MedicalNet's ResNet-18: parameter-free shortcut A, first conv stride 2. dilated:
        # layers 3-4 at stride 1 dilated 2 / 4, the network MedicalNet's weights were trained
        # in (a `her2jax-port --source=medicalnet` port needs it).
        resnet=dict(depth=18, shortcut="A", bias_downsample=True, conv1_t_size=7,
                    conv1_t_stride=2, no_max_pool=False, widen_factor=1.0, dilated=False),
        head=dict(hidden=0, dropout=0.0),
        # Tumour-region pooling beside the encoder, or alone with encoder 'none'
        # (models/roi_pool.py): voxel features of width `hidden` averaged inside the recipe's
        # MASK channel and on nested shells around it whose outer edges are `rim_voxels`
        # (0: off; needs MASK among the recipe's channels).
        roi_pool=dict(hidden=0, rim_voxels=(2,), standardize=False),
        dtype="float32",          # compute dtype; bfloat16 on accelerators (params stay float32)
        pretrained="",            # a her2jax-port output directory, or '' for random init
        seed=0,
    ))


def build_encoder(config, *, rngs: nnx.Rngs,
                  bn_axis_name: str | None = None) -> nnx.Module | None:
    """The encoder of ``config.model`` for ``config.data.recipe``'s channels and grid (None for
    ``encoder='none'``: the tumour-region branch alone feeds the head)."""
    model, recipe = config.model, config.data.recipe
    if model.dtype not in _DTYPES:
        raise Her2jaxError(f"unknown dtype {model.dtype!r} (expected {', '.join(_DTYPES)})",
                           key="model.dtype")
    dtype = _DTYPES[model.dtype]
    channels = len(recipe.channels)
    if model.encoder == "vit3d":
        if model.vit.size not in vit3d.VIT_SIZES:
            raise Her2jaxError(f"unknown ViT size {model.vit.size!r} (expected "
                               f"{', '.join(vit3d.VIT_SIZES)})", key="model.vit.size")
        pool = model.vit.get("pool", "cls")
        return vit3d.ViT3D(in_channels=channels, input_shape=tuple(recipe.shape),
                           patch_size=model.vit.patch_size, attention=model.vit.attention,
                           attention_pad=model.vit.attention_pad, dtype=dtype, rngs=rngs,
                           pool=pool, rim_voxels=model.vit.get("rim_voxels", 2),
                           spread=bool(model.vit.get("spread", False)),
                           mask_channel=(mask_channel(recipe, "model.vit.pool='tumour'",
                                                      "model.vit.pool")
                                         if pool == "tumour" else None),
                           **{**vit3d.VIT_SIZES[model.vit.size],
                              "num_heads": _vit_heads(model.vit)})
    if model.encoder == "resnet3d":
        r = model.resnet
        return resnet3d.ResNet3D(depth=r.depth, in_channels=channels, shortcut=r.shortcut,
                                 bias_downsample=r.bias_downsample, conv1_t_size=r.conv1_t_size,
                                 conv1_t_stride=r.conv1_t_stride,
                                 no_max_pool=r.get("no_max_pool", False),
                                 widen_factor=r.widen_factor, dilated=r.get("dilated", False),
                                 bn_axis_name=bn_axis_name, dtype=dtype, rngs=rngs)
    if model.encoder == "none":
        return None
    raise Her2jaxError(f"unknown encoder {model.encoder!r} (expected {', '.join(ENCODERS)})",
                       key="model.encoder")


def _vit_heads(vit) -> int:
    heads = vit.get("num_heads", 0) or vit3d.VIT_SIZES[vit.size]["num_heads"]
    if heads < 1 or vit3d.VIT_SIZES[vit.size]["embed_dim"] % heads:
        raise Her2jaxError(f"{heads} heads do not divide the {vit.size} ViT's embed dim "
                           f"{vit3d.VIT_SIZES[vit.size]['embed_dim']}", key="model.vit.num_heads")
    return heads


def _port_facts(model) -> dict[str, tuple[object, str]]:
    """The config's values of the architecture facts a port records but no shape shows."""
    if model.encoder == "vit3d":
        return {"num_heads": (_vit_heads(model.vit), "model.vit.num_heads")}
    if model.encoder == "none":
        return {"rim_voxels": (list(roi_pool.shells_of(model.roi_pool.rim_voxels)),
                               "model.roi_pool.rim_voxels")}
    r = model.resnet
    return {"conv1_t_stride": (r.conv1_t_stride, "model.resnet.conv1_t_stride"),
            "dilated": (r.get("dilated", False), "model.resnet.dilated")}


def build_model(config, *, rngs: nnx.Rngs | None = None,
                bn_axis_name: str | None = None) -> heads.Classifier:
    """Encoder + head for ``config``; loads ``config.model.pretrained`` into the encoder (into
    the tumour-region network when it stands alone, ``encoder='none'``).

    Args:
      config: a full config (``data`` and ``model`` sections).
      rngs: parameter and dropout streams (default: from ``config.model.seed``).
      bn_axis_name: mesh axis BatchNorm statistics synchronise over (under shard_map).
    """
    if config.data.scheme not in labels.CLASS_NAMES:
        raise Her2jaxError(f"unknown scheme {config.data.scheme!r} (expected "
                           f"{', '.join(labels.CLASS_NAMES)})", key="data.scheme")
    rngs = rngs or nnx.Rngs(config.model.seed)
    alone = config.model.encoder == "none"
    if alone and not config.model.get("roi_pool", {}).get("hidden", 0):
        raise Her2jaxError("encoder 'none' needs the tumour-region branch "
                           "(model.roi_pool.hidden > 0)", key="model.encoder")
    if config.model.pretrained and not alone:
        # Shapes only, then the port's arrays: random init would be thrown away (and on a
        # CPU it compiles one program per parameter shape). Then the facts shapes cannot
        # show (a stride, a dilation, the heads).
        encoder = nnx.eval_shape(lambda: build_encoder(config, rngs=nnx.Rngs(0),
                                                       bn_axis_name=bn_axis_name))
        port.load_pretrained(encoder, config.model.pretrained)
        port.check_fits(config.model.pretrained, config.model.encoder,
                        _port_facts(config.model))
    else:
        encoder = build_encoder(config, rngs=rngs, bn_axis_name=bn_axis_name)
    if config.model.pretrained and alone:
        # The tumour-region network alone, pretrained (her2jax --mode=pretrain exports it).
        roi = nnx.eval_shape(lambda: build_roi_pool(config, rngs=nnx.Rngs(0),
                                                    bn_axis_name=bn_axis_name))
        port.load_pretrained(roi, config.model.pretrained)
        port.check_fits(config.model.pretrained, "roi_pool", _port_facts(config.model))
    else:
        roi = build_roi_pool(config, rngs=rngs, bn_axis_name=bn_axis_name)
    width = ((encoder.features_dim if encoder is not None else 0)
             + (roi.features_dim if roi is not None else 0))
    head = heads.Head(width, len(labels.CLASS_NAMES[config.data.scheme]),
                      hidden=config.model.head.hidden, dropout=config.model.head.dropout,
                      rngs=rngs)
    return heads.Classifier(encoder, head, roi)


def mask_channel(recipe, needed_by: str, key: str) -> int:
    """The index of the tumour mask (``MASK``) among ``recipe``'s channels; a user error naming
    ``needed_by`` (and the config ``key``) when the recipe has none."""
    names = [str(c).strip().upper() for c in recipe.channels]
    if "MASK" not in names:
        raise Her2jaxError(f"{needed_by} needs the MASK channel in the recipe; its channels "
                           f"are {', '.join(names)}", key=key)
    return names.index("MASK")


def build_roi_pool(config, *, rngs: nnx.Rngs,
                   bn_axis_name: str | None = None) -> roi_pool.RoiPool | None:
    """``config.model.roi_pool``'s branch for the recipe's channels (None when off)."""
    settings = config.model.get("roi_pool", None)
    if settings is None or not settings.hidden:
        return None
    recipe = config.data.recipe
    return roi_pool.RoiPool(in_channels=len(recipe.channels),
                            mask_channel=mask_channel(recipe, "tumour-region pooling",
                                                      "model.roi_pool.hidden"),
                            hidden=int(settings.hidden), rim_voxels=settings.rim_voxels,
                            standardize=bool(settings.get("standardize", False)),
                            bn_axis_name=bn_axis_name, rngs=rngs)
