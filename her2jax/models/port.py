"""PyTorch foundation-encoder checkpoints -> Flax NNX encoder state (an orbax checkpoint).

  her2jax-port --source=NAME --checkpoint=PATH --out=DIR [--in_channels=C]

Named sources (``SOURCES_BY_NAME``) know their files: the wrapper that holds the state dict
(``state_dict`` of a Lightning ``.ckpt``, FMCIB's ``trunk_state_dict``), the key prefixes
(``module.``, ``base_encoder.``, ``encoder.``, ``model.trunk.``), the heads to drop (MoCo's
momentum encoder and projector, SimCLR's projection, MedicalNet's ``conv_seg``) and the
architecture facts that no tensor shows but that change every feature: a ViT's attention
heads, a ResNet's first-convolution stride and whether its layers 3-4 are dilated. A fact
comes from a flag, else from the named source, else the port refuses naming the flag;
``port.json`` records each fact and where it came from, and loading a port into a model
whose config says otherwise is refused (:func:`check_fits`).

Reading never imports torch and never unpickles anything outside an allow-list of tensor
types (:mod:`torch_checkpoint`). The mapping is by name: her2jax's encoders name their
submodules exactly like the PyTorch ones, so ``blocks.3.attn.qkv.weight`` becomes the
state path ``('blocks', 3, 'attn', 'qkv', 'kernel')``, with the layout changes below.

* Linear ``weight (out, in)`` -> ``kernel (in, out)``.
* Conv3d ``weight (O, I, kD, kH, kW)`` -> ``kernel (kD, kH, kW, I, O)``.
* LayerNorm / BatchNorm ``weight`` -> ``scale``; BatchNorm ``running_mean / running_var`` ->
  ``mean / var``; ``num_batches_tracked`` is dropped.
* First-layer inflation: a single-channel pretrained first kernel (``patch_embed.proj`` or
  ``conv1``) loads into a C-channel model by repeating it over the input channels divided
  by C, so a C-channel input whose channels are all equal to x gives exactly the
  single-channel response to x.

Every model parameter must come from the checkpoint (except a ViT's fixed ``pos_embed``,
computed when absent), every checkpoint tensor that is not deliberately dropped must land
in the model, and every shape must match: anything else is a one-line error naming the key.

The output directory holds ``encoder/`` (orbax checkpoint of the encoder's state as a pure
dict) and ``port.json`` (source, input sha256, architecture and the provenance of each of
its facts, key counts, inflation). A MoCo v3 file (FM-BCMRI) also gives ``momentum_encoder/``
(its key encoder) and ``moco_heads/``: the projector (``base_encoder.head``), the predictor
(``predictor``) and the key projector (``momentum_encoder.head``), each a ``_build_mlp``
``Sequential`` of bias-free Linears and BatchNorm1d's, in :class:`her2jax.models.moco.MLP`'s
layout, so ``--mode=pretrain`` continues with the whole MoCo v3 network. It
is written to a temporary sibling and renamed into place, so a failed port leaves nothing;
the folder gets the mode the umask gives a new folder (not mkdtemp's 0700).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from her2jax import treepaths
from her2jax.errors import Her2jaxError
from her2jax.jsonfile import read_json
from her2jax.models import resnet3d, roi_pool, torch_checkpoint, vit3d

PORT_FILE = "port.json"
STATE_DIR = "encoder"
MOMENTUM_DIR = "momentum_encoder"   # a MoCo source's key encoder, when the file holds one
HEADS_DIR = "moco_heads"            # its projector, predictor and key projector, likewise
# Where MoCo v3 (moco/builder.py, MoCo_ViT / MoCo_ResNet) keeps its heads: the projector
# replaces the encoder's classification head (``head`` of a ViT, ``fc`` of a ResNet).
_MOCO_HEADS = {"projector": ("base_encoder.head.", "base_encoder.fc."),
               "predictor": ("predictor.",),
               "key_projector": ("momentum_encoder.head.", "momentum_encoder.fc.")}

# What every checkpoint may carry besides the encoder: BatchNorm's batch counters.
_ALWAYS_DROPPED = r"\.num_batches_tracked$"


@dataclasses.dataclass(frozen=True)
class Source:
    """A public foundation encoder: how its files are laid out and the architecture facts
    its weights cannot tell.

    Attributes:
      name: the ``--source`` value.
      kind: ``vit3d`` or ``resnet3d``.
      title: what it is, for the README and errors.
      wrappers: dict keys that hold the state dict, tried in order (a Lightning ``.ckpt``
        and most training scripts: ``state_dict``).
      prefixes: key prefixes stripped (repeatedly, in any order).
      dropped: regex of (stripped) keys a port leaves out on purpose: heads, projectors,
        momentum encoders.
      facts: architecture facts the source fixes (``conv1_t_stride``, ``dilated``).
      heads_by_width: ViT attention heads by embedding width (``num_heads`` is not in the
        weights); a width not listed needs ``--num_heads``.
      momentum_prefix: the key prefix of a MoCo momentum (key) encoder the files hold; a
        port writes it beside the encoder (``MOMENTUM_DIR``), for ``--mode=pretrain`` to
        continue from.
    """

    name: str
    kind: str
    title: str
    wrappers: tuple[str, ...] = ("state_dict", "model", "module", "net")
    prefixes: tuple[str, ...] = ("module.",)
    dropped: str = r"^(head|fc)\."
    facts: Mapping = dataclasses.field(default_factory=dict)
    heads_by_width: Mapping = dataclasses.field(default_factory=dict)
    momentum_prefix: str = ""


_SOURCE_LIST = (
    Source("fmbcmri", "vit3d", "FM-BCMRI 3D ViT (MoCo v3; ViT-B/8 and vit_3d_small)",
           prefixes=("module.", "base_encoder."),
           dropped=r"^(momentum_encoder|predictor|projector|head)\.",
           # FM-BCMRI's vit_3d_base and vit_3d_small both use 12 heads (64 and 32 wide).
           heads_by_width={768: 12, 384: 12}, momentum_prefix="momentum_encoder."),
    Source("breastmrfm", "resnet3d", "BreastMR-FM (MONAI resnet10, SimCLR, Lightning .ckpt)",
           prefixes=("module.", "encoder."), dropped=r"^(projection|fc)\.",
           # monai.networks.nets.resnet10(spatial_dims=3, n_input_channels=1,
           # feed_forward=False): MONAI's default stem stride 1, no dilation.
           facts={"conv1_t_stride": 1, "dilated": False}),
    Source("medicalnet", "resnet3d", "MedicalNet / Med3D 3D ResNet (Tencent, as trained)",
           prefixes=("module.",), dropped=r"^(fc|conv_seg)\.",
           # Tencent's models/resnet.py: a 7x7x7 / 2 stem, layers 3-4 stride 1 dilated 2 / 4.
           facts={"conv1_t_stride": 2, "dilated": True}),
    Source("fmcib", "resnet3d", "FMCIB (MONAI resnet50, widen 2; model_weights.torch or "
           "Lighter .ckpt)",
           wrappers=("trunk_state_dict", "state_dict"),
           prefixes=("module.", "model.trunk.", "model.backbone.", "trunk."),
           dropped=r"^(model\.heads|heads|latent_var_head|fc)\.",
           # fmcib's resnet50(): monai resnet50(widen_factor=2, conv1_t_stride=2,
           # feed_forward=False).
           facts={"conv1_t_stride": 2, "dilated": False}),
    Source("monai-resnet", "resnet3d", "any monai.networks.nets.ResNet state dict "
           "(--conv1_t_stride required)",
           prefixes=("module.", "encoder.", "backbone."), facts={"dilated": False}),
    Source("timm-vit3d", "vit3d", "any timm-style 3D ViT state dict (--num_heads required)",
           prefixes=("module.", "base_encoder.", "encoder.", "backbone.")),
)
SOURCES_BY_NAME = {source.name: source for source in _SOURCE_LIST}
SOURCES = tuple(SOURCES_BY_NAME)

# Architecture facts no tensor shows, and the flag that sets each.
FACT_FLAGS = {"num_heads": "--num_heads", "conv1_t_stride": "--conv1_t_stride",
              "dilated": "--dilated"}


def source_of(name: str) -> Source:
    """The named source; an unknown name is a one-line error listing the known ones."""
    if name not in SOURCES_BY_NAME:
        raise Her2jaxError(f"unknown source {name!r} (expected one of {', '.join(SOURCES)})",
                           key="source")
    return SOURCES_BY_NAME[name]


@dataclasses.dataclass
class PortReport:
    """What a port mapped.

    Attributes:
      source: the ``--source`` name.
      checkpoint: the input file.
      sha256: of the input file.
      architecture: the encoder's constructor arguments.
      facts: for every architecture argument, ``{"value", "from"}``: ``file`` (read from
        the tensors' names and shapes), ``source <name>`` (fixed by the named source) or
        ``flag --<name>`` (given by the user).
      mapped: checkpoint keys that became encoder parameters.
      dropped: checkpoint keys dropped on purpose (momentum encoder, heads, counters).
      computed: encoder state computed rather than loaded (a missing fixed pos_embed).
      inflation: ``{"key", "from_channels", "to_channels"}`` when the first layer was inflated.
      momentum_encoder: the port also holds the file's MoCo momentum encoder
        (``MOMENTUM_DIR``).
      moco_heads: ``{head: {"widths", "last_bn"}}`` of the MoCo v3 heads the port holds
        (``HEADS_DIR``), or None.
    """

    source: str
    checkpoint: str
    sha256: str
    architecture: dict
    facts: dict
    mapped: list[str]
    dropped: list[str]
    computed: list[str]
    inflation: dict | None
    momentum_encoder: bool = False
    moco_heads: dict | None = None

    def summary(self) -> str:
        """Multi-line report for the terminal."""
        arch = ", ".join(f"{k}={v}" for k, v in self.architecture.items())
        lines = [f"{self.source}: {Path(self.checkpoint).name} (sha256 {self.sha256[:12]}...)",
                 f"  architecture: {arch}"]
        told = [f"{k}={f['value']} ({f['from']})" for k, f in self.facts.items()
                if f["from"] != "file"]
        if told:
            lines.append(f"  not in the weights: {', '.join(told)}")
        lines.append(f"  mapped {len(self.mapped)} tensors, dropped {len(self.dropped)} "
                     f"({_describe_dropped(self.dropped)}), missing 0, unexpected 0")
        if self.computed:
            lines.append(f"  computed (not in the checkpoint): {', '.join(self.computed)}")
        if self.momentum_encoder:
            lines.append(f"  momentum encoder kept in {MOMENTUM_DIR}/ (--mode=pretrain "
                         "continues with it as the key encoder)")
        if self.moco_heads:
            heads = ", ".join(f"{name} {'-'.join(map(str, shape['widths']))}"
                              for name, shape in self.moco_heads.items())
            lines.append(f"  MoCo v3 heads kept in {HEADS_DIR}/: {heads}")
        if self.inflation:
            lines.append("  inflated {key}: {from_channels} -> {to_channels} input channels "
                         "(kernel repeated over channels / {to_channels})".format(
                             **self.inflation))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "source": self.source, "checkpoint": self.checkpoint, "sha256": self.sha256,
            "architecture": self.architecture, "facts": self.facts,
            "num_mapped": len(self.mapped), "num_dropped": len(self.dropped),
            "num_missing": 0, "num_unexpected": 0,
            "computed": self.computed, "inflation": self.inflation,
            "momentum_encoder": self.momentum_encoder,
            "moco_heads": self.moco_heads,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }


def _describe_dropped(keys: list[str]) -> str:
    groups: dict[str, int] = {}
    for key in keys:
        group = key.split(".")[0] if not key.endswith("num_batches_tracked") else \
            "num_batches_tracked"
        groups[group] = groups.get(group, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(groups.items())) or "none"


def encoder_tensors(raw, source: Source, *, file: str) -> tuple[dict[str, np.ndarray],
                                                                 list[str]]:
    """The encoder's tensors from a loaded checkpoint: unwraps the source's wrapper keys
    (``state_dict``, ``trunk_state_dict``, ...), strips its key prefixes (``module.``,
    ``encoder.``, ``model.trunk.``, ...) and drops what a port of that source never uses.

    Returns:
      (tensors by stripped key, dropped original keys).
    """
    state = raw
    while isinstance(state, Mapping) and not _looks_like_state(state):
        inner = next((state[k] for k in source.wrappers if isinstance(state.get(k), Mapping)),
                     None)
        if inner is None:
            wanted = " or ".join(repr(k) for k in source.wrappers)
            raise Her2jaxError(f"holds no state dict (no tensors, no {wanted} entry; a "
                               f"{source.name} checkpoint?)", file=file)
        state = inner
    if not isinstance(state, Mapping):
        raise Her2jaxError(f"holds a {type(state).__name__}, not a state dict", file=file)
    dropped_re = re.compile(f"{source.dropped}|{_ALWAYS_DROPPED}")
    tensors, dropped = {}, []
    for key, value in state.items():
        if not isinstance(value, np.ndarray):
            continue
        stripped = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in source.prefixes:
                if stripped.startswith(prefix):
                    stripped, changed = stripped[len(prefix):], True
        if dropped_re.search(stripped):
            dropped.append(str(key))
        elif stripped in tensors:
            raise Her2jaxError(f"holds {stripped} twice once its prefixes are stripped (two "
                               "networks in one file?)", file=file, key=str(key))
        else:
            tensors[stripped] = value
    return tensors, sorted(dropped)


def _moco_mlp(tensors: Mapping[str, np.ndarray], prefix: str, *,
              file: str) -> tuple[dict, dict] | None:
    """One MoCo v3 ``_build_mlp`` ``Sequential`` under ``prefix`` (indexed layers: a bias-free
    Linear, then a BatchNorm1d, with or without affine, or none after the last Linear) as
    :class:`her2jax.models.moco.MLP`'s pure state, and its shape (:func:`mlp_shape`); None
    when the keys under ``prefix`` are not such a Sequential (e.g. a plain classification
    head)."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        index, _, name = key[len(prefix):].partition(".")
        if not index.isdigit() or "." in name:
            return None
        layers.setdefault(int(index), {})[name] = value
    linears: dict[int, dict] = {}
    norms: dict[int, dict] = {}
    for index in sorted(layers):
        entry = layers[index]
        entry.pop("num_batches_tracked", None)
        if set(entry) == {"weight"} and entry["weight"].ndim == 2:
            linears[len(linears)] = {"kernel": np.ascontiguousarray(entry["weight"].T)}
        elif {"running_mean", "running_var"} <= set(entry) and linears:
            norm = {"mean": entry["running_mean"], "var": entry["running_var"]}
            if "weight" in entry:
                norm.update(scale=entry["weight"], bias=entry["bias"])
            if len(linears) - 1 in norms:
                return None
            norms[len(linears) - 1] = norm
        else:
            return None
    if not linears:
        return None
    dims = [int(linears[0]["kernel"].shape[0])]
    for i in sorted(linears):
        kernel = linears[i]["kernel"]
        if kernel.shape[0] != dims[-1]:
            raise Her2jaxError(f"{prefix}: layer {i} takes {kernel.shape[0]} inputs after a "
                               f"layer of {dims[-1]} outputs (not a MoCo v3 MLP)", file=file)
        dims.append(int(kernel.shape[1]))
        norm = norms.get(i)
        if i < len(linears) - 1 and (norm is None or "scale" not in norm):
            raise Her2jaxError(f"{prefix}: hidden layer {i} has no affine BatchNorm1d (not a "
                               "MoCo v3 MLP)", file=file)
        if norm is not None and any(v.shape != (dims[-1],) for v in norm.values()):
            raise Her2jaxError(f"{prefix}: the BatchNorm1d after layer {i} is not "
                               f"{dims[-1]} wide", file=file)
    mlp = {"linears": linears, "norms": norms}
    return mlp, mlp_shape(mlp)


def mlp_shape(mlp: Mapping) -> dict:
    """``{"widths": [in, hidden..., out], "last_bn": bool}`` of a MoCo MLP's pure state."""
    kernels = [mlp["linears"][i]["kernel"] for i in sorted(mlp["linears"])]
    return {"widths": [int(kernels[0].shape[0]), *(int(k.shape[1]) for k in kernels)],
            "last_bn": len(mlp["norms"]) == len(kernels)}


def moco_heads(raw, *, file: str) -> tuple[dict, dict] | None:
    """A MoCo v3 file's heads: ({"projector", "predictor"[, "key_projector"]: pure state},
    {head: :func:`mlp_shape`}), or None when the file holds no projector and predictor."""
    source = Source("moco-heads", "", "", prefixes=("module.",), dropped=r"^$(?!)")
    tensors, _ = encoder_tensors(raw, source, file=file)
    heads, dims = {}, {}
    for name, prefixes in _MOCO_HEADS.items():
        for prefix in prefixes:
            found = _moco_mlp(tensors, prefix, file=file)
            if found is not None:
                heads[name], dims[name] = found
                break
    if "projector" not in heads or "predictor" not in heads:
        return None
    return heads, dims


def _looks_like_state(d: Mapping) -> bool:
    return any(isinstance(v, np.ndarray) for v in d.values())


def _fact(name: str, source: Source, given, default_from_file=None, *, file: str,
          why: str) -> dict:
    """``{"value", "from"}`` for an architecture fact the weights cannot show: the flag if
    given, else the source's, else a one-line refusal naming the flag."""
    if given is not None:
        return {"value": given, "from": f"flag {FACT_FLAGS[name]}"}
    if name in source.facts:
        return {"value": source.facts[name], "from": f"source {source.name}"}
    if default_from_file is not None:
        return default_from_file
    raise Her2jaxError(f"{name} cannot be read from the weights and source {source.name} does "
                       f"not fix it ({why}); pass {FACT_FLAGS[name]}", file=file,
                       key=FACT_FLAGS[name].lstrip("-"))


def infer_architecture(source: str | Source, tensors: dict[str, np.ndarray], *, file: str,
                       num_heads: int | None = None, conv1_t_stride: int | None = None,
                       dilated: bool | None = None) -> tuple[dict, dict]:
    """The encoder's constructor arguments and where each came from.

    Shapes and names give most of the architecture; the attention heads of a ViT, and the
    first convolution's stride and the dilation of a ResNet, change the features without
    changing a single shape. Those come from the flags, else from the named source, else the
    port refuses (one line naming the flag): a guess would port silently wrong features.

    Args:
      source: a ``Source`` or its name.
      tensors: from :func:`encoder_tensors`.
      file: for error messages.
      num_heads: ViT attention heads (``--num_heads``).
      conv1_t_stride: ResNet first-conv stride along D (``--conv1_t_stride``).
      dilated: ResNet layers 3-4 dilated as Tencent's MedicalNet (``--dilated``).

    Returns:
      (architecture, facts): ``facts[name] = {"value", "from"}`` for every argument.
    """
    source = source_of(source) if isinstance(source, str) else source
    if source.kind == "vit3d":
        if conv1_t_stride is not None or dilated is not None:
            raise Her2jaxError(f"--conv1_t_stride / --dilated are ResNet facts; {source.name} "
                               "is a ViT", key="conv1_t_stride" if conv1_t_stride is not None
                               else "dilated")
        _expect(tensors, ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"),
                source, file)
        embed_dim = int(tensors["cls_token"].shape[-1])
        proj = tensors["patch_embed.proj.weight"]
        if proj.ndim != 5 or len(set(proj.shape[2:])) != 1:
            raise Her2jaxError(f"patch_embed.proj.weight has shape {proj.shape}; expected a "
                               "cubic Conv3d kernel (E, C, p, p, p)", file=file)
        patch = int(proj.shape[2])
        depth = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
        grid = 6
        if "pos_embed" in tensors:
            tokens = int(tensors["pos_embed"].shape[1]) - 1
            grid = round(tokens ** (1 / 3))
            if grid ** 3 != tokens:
                raise Her2jaxError(f"pos_embed has {tokens} patch tokens, not a cube; "
                                   "her2jax ports cubic inputs only", file=file, key="pos_embed")
        architecture = dict(kind="vit3d", in_channels=int(proj.shape[1]),
                            input_shape=[grid * patch] * 3, patch_size=patch,
                            embed_dim=embed_dim, depth=depth,
                            mlp_ratio=float(tensors["blocks.0.mlp.fc1.weight"].shape[0])
                            / embed_dim)
        known = source.heads_by_width.get(embed_dim)
        facts = {k: {"value": v, "from": "file"} for k, v in architecture.items()}
        facts["num_heads"] = _fact(
            "num_heads", source, num_heads,
            {"value": known, "from": f"source {source.name} (embed {embed_dim})"}
            if known else None, file=file,
            why=f"it knows the heads of embed widths {sorted(source.heads_by_width)}, the "
                f"checkpoint's is {embed_dim}" if source.heads_by_width
            else "it ports any ViT")
        heads = facts["num_heads"]["value"]
        if embed_dim % heads:
            raise Her2jaxError(f"embed dim {embed_dim} is not divisible by {heads} heads",
                               key="num_heads")
        architecture["num_heads"] = heads
        return architecture, facts
    if num_heads is not None:
        raise Her2jaxError(f"--num_heads is a ViT fact; {source.name} is a ResNet",
                           key="num_heads")
    _expect(tensors, ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight"),
            source, file)
    counts = tuple(1 + max((int(k.split(".")[1]) for k in tensors
                            if k.startswith(f"layer{i}.")), default=-1)
                   for i in range(1, 5))
    block = "bottleneck" if "layer1.0.conv3.weight" in tensors else "basic"
    depth = next((d for d, (b, c) in resnet3d.RESNET_LAYERS.items()
                  if b == block and tuple(c) == counts), None)
    if depth is None:
        raise Her2jaxError(f"{block} blocks per layer {counts} match no ResNet depth of "
                           f"{sorted(resnet3d.RESNET_LAYERS)}", file=file)
    conv1 = tensors["conv1.weight"]
    downsample = [k for k in tensors if ".downsample.0.weight" in k]
    architecture = dict(kind="resnet3d", depth=depth, in_channels=int(conv1.shape[1]),
                        shortcut="B" if downsample else "A",
                        bias_downsample=any(".downsample.0.bias" in k for k in tensors),
                        conv1_t_size=int(conv1.shape[2]),
                        widen_factor=float(conv1.shape[0]) / 64)
    facts = {k: {"value": v, "from": "file"} for k, v in architecture.items()}
    facts["conv1_t_stride"] = _fact("conv1_t_stride", source, conv1_t_stride, file=file,
                                    why="MONAI's default is 1, MedicalNet's 2")
    facts["dilated"] = _fact("dilated", source, dilated, file=file,
                             why="only Tencent's MedicalNet dilates layers 3-4")
    architecture["conv1_t_stride"] = facts["conv1_t_stride"]["value"]
    architecture["dilated"] = facts["dilated"]["value"]
    return architecture, facts


def _expect(tensors: dict, keys: tuple[str, ...], source: Source, file: str) -> None:
    missing = [k for k in keys if k not in tensors]
    if not missing:
        return
    hint = ""
    if source.kind == "resnet3d" and "cls_token" in tensors:
        hint = "; it looks like a ViT: pass --source=fmbcmri or timm-vit3d"
    elif source.kind == "vit3d" and "conv1.weight" in tensors:
        hint = ("; it looks like a ResNet: pass --source=medicalnet, breastmrfm, fmcib or "
                "monai-resnet")
    else:
        # Keys under a prefix this source does not strip (another source's wrapper)?
        found = next((k for k in tensors if k.endswith(f".{missing[0]}")), None)
        if found:
            hint = (f"; it holds {found}: another source's layout (see her2jax-port "
                    "--helpfull for the sources)")
    raise Her2jaxError(f"is not a {source.name} checkpoint: missing {', '.join(missing)}"
                       f"{hint}", file=file)


def build_encoder(architecture: Mapping, *, in_channels: int | None = None,
                  rngs: nnx.Rngs | None = None, **overrides) -> nnx.Module:
    """Constructs the encoder a port describes (``in_channels`` may differ: inflation)."""
    args = {k: v for k, v in architecture.items() if k != "kind"}
    if in_channels:
        args["in_channels"] = in_channels
    args.update(overrides)
    rngs = rngs or nnx.Rngs(0)
    if architecture["kind"] == "vit3d":
        args["input_shape"] = tuple(args["input_shape"])
        return vit3d.ViT3D(**args, rngs=rngs)
    if architecture["kind"] == "resnet3d":
        return resnet3d.ResNet3D(**args, rngs=rngs)
    raise Her2jaxError(f"unknown encoder kind {architecture['kind']!r}", key="kind")


def _first_layer(kind: str) -> str:
    return "patch_embed.proj.weight" if kind == "vit3d" else "conv1.weight"


def map_tensors(tensors: dict[str, np.ndarray], model: nnx.Module, *, kind: str,
                file: str) -> tuple[dict, list[str], list[str], dict | None]:
    """Places every checkpoint tensor into the model's state (as a pure dict).

    Returns:
      (pure state dict, mapped keys, computed paths, inflation or None).
    """
    pure = nnx.to_pure_dict(nnx.state(model))
    filled: set[tuple] = set()
    inflation = None
    for key in sorted(tensors):
        value = tensors[key]
        parts = [int(p) if p.isdigit() else p for p in key.split(".")]
        module = model
        for part in parts[:-1]:
            try:
                module = module[part] if isinstance(part, int) else getattr(module, part)
            except (AttributeError, IndexError, KeyError, TypeError):
                raise Her2jaxError("has no place in the encoder (unexpected key; wrong "
                                   "source or architecture?)", file=file, key=key) from None
        leaf, value = _convert(module, parts[-1], value, key=key, file=file)
        path = (*parts[:-1], leaf)
        target = _get(pure, path)
        if target is None:
            raise Her2jaxError("has no place in the encoder (unexpected key)", file=file,
                               key=key)
        if key == _first_layer(kind) and value.shape[-2] == 1 and target.shape[-2] > 1:
            channels = int(target.shape[-2])
            value = np.repeat(value, channels, axis=-2) / channels
            inflation = {"key": key, "from_channels": 1, "to_channels": channels}
        if tuple(value.shape) != tuple(target.shape):
            raise Her2jaxError(f"shape {tuple(tensors[key].shape)} in the checkpoint "
                               f"does not fit the encoder's {tuple(target.shape)} "
                               f"(as {leaf} {tuple(value.shape)})", file=file, key=key)
        _set(pure, path, np.asarray(value, dtype=target.dtype))
        filled.add(path)
    computed = []
    for path, leaf in _leaves(pure):
        if path in filled:
            continue
        if path == ("pos_embed",):
            computed.append("pos_embed")   # fixed sin-cos: the model's own construction
            _set(pure, path, np.asarray(leaf))
            continue
        name = ".".join(str(p) for p in path)
        raise Her2jaxError(f"the checkpoint lacks the encoder's {name} (missing key)",
                           file=file, key=name)
    return pure, sorted(tensors), computed, inflation


def _convert(module, name: str, value: np.ndarray, *, key: str, file: str):
    """(flax leaf name, array in Flax layout) for a PyTorch parameter of ``module``."""
    if isinstance(module, nnx.Linear):
        if name == "weight":
            return "kernel", _check_ndim(value, 2, key, file).T
        return name, value
    if isinstance(module, nnx.Conv):
        if name == "weight":
            return "kernel", np.transpose(_check_ndim(value, 5, key, file), (2, 3, 4, 1, 0))
        return name, value
    if isinstance(module, nnx.LayerNorm | nnx.BatchNorm):
        renamed = {"weight": "scale", "running_mean": "mean", "running_var": "var"}
        return renamed.get(name, name), value
    return name, value


def _check_ndim(value: np.ndarray, ndim: int, key: str, file: str) -> np.ndarray:
    if value.ndim != ndim:
        raise Her2jaxError(f"has {value.ndim} dimensions {tuple(value.shape)}, expected "
                           f"{ndim}", file=file, key=key)
    return value


def _get(tree, path):
    for part in path:
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return None if isinstance(tree, Mapping) else tree


def _set(tree, path, value) -> None:
    for part in path[:-1]:
        tree = tree[part]
    tree[path[-1]] = value


def _leaves(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def port(source: str, checkpoint, out, *, in_channels: int | None = None,
         num_heads: int | None = None, conv1_t_stride: int | None = None,
         dilated: bool | None = None, overwrite: bool = False) -> PortReport:
    """Ports a PyTorch checkpoint into ``out`` (``encoder/`` + ``port.json``).

    Args:
      source: one of ``SOURCES`` (see :data:`SOURCES_BY_NAME`).
      checkpoint: ``.pth`` / ``.pth.tar`` / ``.pt`` / ``.ckpt`` / ``.torch`` (zip or legacy
        serialisation) or ``.safetensors``.
      out: the output directory (must not exist, or be empty, unless ``overwrite``).
      in_channels: the model's input channels C (the dataset recipe's channel count); a
        single-channel first layer is inflated to C. Default: the checkpoint's.
      num_heads: ViT heads, where the source does not fix them.
      conv1_t_stride: ResNet first-conv stride, where the source does not fix it.
      dilated: ResNet layers 3-4 dilated (Tencent's MedicalNet), where the source does not
        fix it.
      overwrite: replace an existing port in ``out``.
    """
    spec = source_of(source)
    checkpoint = Path(checkpoint)
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise Her2jaxError("exists and is not empty; pass --overwrite to replace it",
                           file=str(out))
    raw = torch_checkpoint.load_state(checkpoint)
    tensors, dropped = encoder_tensors(raw, spec, file=str(checkpoint))
    architecture, facts = infer_architecture(spec, tensors, file=str(checkpoint),
                                             num_heads=num_heads,
                                             conv1_t_stride=conv1_t_stride, dilated=dilated)
    if in_channels and in_channels != architecture["in_channels"]:
        if architecture["in_channels"] != 1:
            raise Her2jaxError(f"first layer has {architecture['in_channels']} input channels;"
                               f" only single-channel kernels inflate to {in_channels}",
                               file=str(checkpoint), key="in_channels")
        architecture["in_channels"] = in_channels
        facts["in_channels"] = {"value": in_channels, "from": "flag --in_channels (inflated "
                                "from the file's 1)"}
    model = nnx.eval_shape(lambda: build_encoder(architecture))
    pure, mapped, computed, inflation = map_tensors(tensors, _concrete_pos(model, architecture),
                                                    kind=architecture["kind"],
                                                    file=str(checkpoint))
    momentum = None
    if spec.momentum_prefix:
        # The key encoder: the same network under another prefix (its head dropped).
        key_source = dataclasses.replace(spec, prefixes=("module.", spec.momentum_prefix),
                                         dropped=r"^(base_encoder|predictor|projector|head)\.")
        key_tensors, _ = encoder_tensors(raw, key_source, file=str(checkpoint))
        if key_tensors:
            momentum, *_ = map_tensors(key_tensors, _concrete_pos(model, architecture),
                                       kind=architecture["kind"], file=str(checkpoint))
    heads = moco_heads(raw, file=str(checkpoint)) if spec.momentum_prefix else None
    report = PortReport(spec.name, str(checkpoint), torch_checkpoint.sha256(checkpoint),
                        architecture, facts, mapped, dropped, computed, inflation,
                        momentum_encoder=momentum is not None,
                        moco_heads=heads[1] if heads else None)
    write_port(out, pure, report, momentum=momentum, heads=heads[0] if heads else None)
    return report


def _concrete_pos(model: nnx.Module, architecture: Mapping) -> nnx.Module:
    """The abstract model, with a ViT's fixed pos_embed made concrete (it may be computed)."""
    if architecture["kind"] == "vit3d":
        grid = tuple(s // architecture["patch_size"] for s in architecture["input_shape"])
        table = vit3d.sincos_pos_embed_3d(grid, architecture["embed_dim"])[None]
        model.pos_embed = vit3d.PosEmbed(np.asarray(table, np.float32))
    return model


def write_port(out: Path, pure: dict, report: PortReport, *,
               momentum: dict | None = None, heads: dict | None = None) -> None:
    """Writes a port directory atomically: ``STATE_DIR`` (orbax, the encoder's arrays), the
    momentum encoder's in ``MOMENTUM_DIR`` and the MoCo heads in ``HEADS_DIR`` when given,
    and ``port.json`` (``report``), replacing ``out`` if it exists. Called by one process of a multi-process run (the others
    do not wait for it)."""
    import orbax.checkpoint as ocp

    from her2jax.fileio import current_umask

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # mkdtemp makes its folder 0700 whatever the umask; the output gets the mode a plain
        # mkdir would give it, like everything else the console scripts write.
        os.chmod(tmp, 0o777 & ~current_umask())
        # The arrays are this host's copies and only the calling process writes: orbax's
        # default would wait at a barrier for every process of a multi-process run.
        me = jax.process_index()
        checkpointer = ocp.StandardCheckpointer(
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}))
        checkpointer.save(tmp / STATE_DIR, jax.tree.map(np.asarray, pure))
        checkpointer.wait_until_finished()
        for name, tree in ((MOMENTUM_DIR, momentum), (HEADS_DIR, heads)):
            if tree is not None:
                checkpointer.save(tmp / name, jax.tree.map(np.asarray, tree))
                checkpointer.wait_until_finished()
        (tmp / PORT_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_port(directory) -> dict:
    """``port.json`` of a port directory."""
    return read_json(Path(directory) / PORT_FILE, where=directory,
                     missing="is not a her2jax-port output (no port.json)")


# Facts a port made before they were recorded had these values (her2jax built no other).
_LEGACY_FACTS = {"dilated": False}


def _triple_or_value(value):
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value) if len(set(value)) > 1 else int(value[0])
    return value


def check_fits(directory, kind: str, wanted: Mapping[str, tuple[object, str]]) -> dict:
    """Refuses a port whose weights were made for another network than the config's.

    Shapes catch most mismatches when the weights load; these facts change the features
    without changing a shape, so they are compared here.

    Args:
      directory: the port.
      kind: the config's encoder (``vit3d`` / ``resnet3d``, or ``roi_pool`` for the
        tumour-region network alone).
      wanted: ``{fact: (the config's value, its config key)}``.

    Returns:
      port.json.

    Raises:
      Her2jaxError: one line naming the config key, the port's value and where it came from.
    """
    meta = read_port(directory)
    architecture = meta.get("architecture") or {}
    if architecture.get("kind") != kind:
        raise Her2jaxError(f"port holds a {architecture.get('kind')} encoder "
                           f"({meta.get('source')}), the config builds a {kind}",
                           file=str(directory), key="model.encoder")
    facts = meta.get("facts") or {}
    for name, (value, key) in wanted.items():
        ported = architecture.get(name, _LEGACY_FACTS.get(name))
        if _triple_or_value(ported) != _triple_or_value(value):
            origin = (facts.get(name) or {}).get("from", "port.json")
            raise Her2jaxError(
                f"port was made for {name}={ported} ({origin}) but {key} is {value}: set "
                f"--config.{key}={ported} (the weights give other features in another "
                "network)", file=str(directory), key=key)
    return meta


def holds(directory, part: str) -> bool:
    """Whether a port holds ``part`` beside its encoder: ``MOMENTUM_DIR`` (a MoCo momentum
    encoder) or ``HEADS_DIR`` (a MoCo v3 file's projector and predictor)."""
    return bool(directory) and (Path(directory) / part).is_dir()


def read_moco_heads(directory, target: dict) -> dict:
    """The port's MoCo heads restored into the structure, shapes and dtypes of ``target``
    (``{head: pure state}``, heads the port lacks left out)."""
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    return ocp.StandardCheckpointer().restore(Path(directory).absolute() / HEADS_DIR, target)


def load_pretrained(model: nnx.Module, directory, *, state_dir: str = STATE_DIR) -> dict:
    """Loads a port's encoder state (or, with ``state_dir=MOMENTUM_DIR``, its momentum
    encoder's) into ``model`` in place (the model's own shapes and shardings are the restore
    target). Returns port.json.

    Raises:
      Her2jaxError: the port does not fit the model (names the first tensor that differs).
    """
    import orbax.checkpoint as ocp

    meta = read_port(directory)
    kind = ("vit3d" if isinstance(model, vit3d.ViT3D) else
            "roi_pool" if isinstance(model, roi_pool.RoiPool) else "resnet3d")
    ported_kind = (meta.get("architecture") or {}).get("kind")
    if ported_kind != kind:
        raise Her2jaxError(f"port holds a {ported_kind} encoder ({meta.get('source')}), the "
                           f"config builds a {kind}", file=str(directory), key="model.encoder")
    path = Path(directory).absolute() / state_dir
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    checkpointer = ocp.StandardCheckpointer()
    stored = {treepaths.dotted(p): tuple(m.shape) for p, m in _leaves(checkpointer.metadata(path).item_metadata)}
    wanted = {treepaths.dotted(p): tuple(v.shape) for p, v in _leaves(pure)}
    for name in sorted(set(stored) | set(wanted)):
        if stored.get(name) != wanted.get(name):
            raise Her2jaxError(
                f"port does not fit this encoder: {name} is {stored.get(name, 'absent')} in the "
                f"port and {wanted.get(name, 'absent')} in the model (architecture "
                f"{meta.get('architecture')})", file=str(directory))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=getattr(x, "sharding", None)),
                          pure)
    nnx.replace_by_pure_dict(state, checkpointer.restore(path, target))
    nnx.update(model, state)
    return meta
