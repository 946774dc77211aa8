"""The PyTorch reference of bench_train.py: the same models, step and optimizer as her2jax.

What a PyTorch user would run for the same job, written from PyTorch's own parts:

- ``ViT3D``: FM-BCMRI's 3D ViT as ``her2jax.models.vit3d`` builds it, module for module (the
  attribute names are timm's, like her2jax's state paths): ``Conv3d`` patch embedding with
  kernel = stride = patch, a CLS token, the fixed 3D sin-cos position embedding (a buffer, not a
  parameter, as her2jax's ``PosEmbed``), pre-norm blocks (LayerNorm eps 1e-6, one fused ``qkv``
  Linear, ``torch.nn.functional.scaled_dot_product_attention``, exact-GELU MLP of ratio 4), a
  final LayerNorm on the CLS token and a linear head.
- ``resnet``: MONAI's ``monai.networks.nets.resnet{depth}`` (MedicalNet's shortcut 'A', first
  conv stride 2), which ``her2jax.models.resnet3d`` mirrors, with a ``num_classes`` head.
- ``make_optimizer``: ``torch.optim.AdamW`` in parameter groups that reproduce
  ``her2jax.train.optim.make_optimizer`` for a fully trained model: layer-wise learning-rate
  decay (the same layer ids), weight decay on kernels only (ndim >= 2, not the CLS token),
  gradient clipping by global norm, linear warmup then cosine decay (a ``LambdaLR``).
- ``TrainStep`` / ``FeatureStep``: the work of ``her2jax.train.step.make_train_step`` and
  ``make_predict``: float16 input cast to float32, the same on-device augmentation (flips,
  intensity scale / shift, Gaussian noise; drawn with torch's generator, so the values differ
  but not the work), class-weighted cross-entropy on float32 logits, backward, clipping,
  AdamW; or an eval-mode forward under ``torch.inference_mode`` returning softmax
  probabilities and features.

This module imports torch (and MONAI for ResNets) only: the benchmark's PyTorch processes do
not import JAX.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from her2jax.models import vit3d

_LN_EPSILON = 1e-6


def sincos_pos_embed_3d(grid: Sequence[int], embed_dim: int) -> torch.Tensor:
    """FM-BCMRI's fixed 3D sin-cos table with a zero CLS row: [1, 1 + gx·gy·gz, E] float32.

    her2jax's own table (``her2jax.models.vit3d.sincos_pos_embed_3d``): it is fixed, not
    learned, so both frameworks get the same buffer.
    """
    return torch.from_numpy(vit3d.sincos_pos_embed_3d(grid, embed_dim))[None]


class PatchEmbed(nn.Module):
    """[B, C, X, Y, Z] -> [B, N, E]: non-overlapping p³ patches, row-major token order."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm-style multi-head self-attention on PyTorch's fused SDPA kernel."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, e = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, e // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)       # each [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, e))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPSILON)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPSILON)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """FM-BCMRI's 3D ViT with a linear head: [B, C, X, Y, Z] -> [B, K] logits.

    Args:
      in_channels, input_shape (X, Y, Z), patch_size, embed_dim, depth, num_heads, mlp_ratio:
        as ``her2jax.models.vit3d.ViT3D``.
      num_classes: K of the head (on the final-norm CLS token).
    """

    def __init__(self, *, in_channels: int, input_shape: Sequence[int], patch_size: int,
                 embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 num_classes: int = 3):
        super().__init__()
        grid = [int(s) // patch_size for s in input_shape]
        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size)
        self.cls_token = nn.Parameter(1e-6 * torch.randn(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_3d(grid, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPSILON)
        self.head = nn.Linear(embed_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, X, Y, Z] -> [B, E] float32: the CLS token after the final norm."""
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0]).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _ResNetFeatures(nn.Module):
    """A MONAI ResNet split into features (pooled ``layer4``) and its ``fc`` head."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return net.avgpool(x).flatten(1).float()

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resnet(*, depth: int, in_channels: int, shortcut: str, bias_downsample: bool,
           conv1_t_size: int, conv1_t_stride: int, widen_factor: float,
           num_classes: int = 3) -> nn.Module:
    """MONAI's ``resnet{depth}(spatial_dims=3, ...)`` with a ``num_classes`` head.

    The returned module's state dict keys are MONAI's under ``net.``; ``features(x)`` gives the
    pooled ``layer4`` output (what ``her2jax.models.resnet3d.ResNet3D`` returns).
    """
    from monai.networks.nets import resnet as monai_resnet

    net = getattr(monai_resnet, f"resnet{depth}")(
        spatial_dims=3, n_input_channels=in_channels, num_classes=num_classes,
        shortcut_type=shortcut, bias_downsample=bias_downsample, conv1_t_size=conv1_t_size,
        conv1_t_stride=conv1_t_stride, widen_factor=widen_factor)
    return _ResNetFeatures(net)


# ----------------------------------------------------------------------------------------------
# Optimizer: her2jax.train.optim for a fully trained model, in PyTorch parameter groups


def layer_id(name: str, *, vit_depth: int | None) -> tuple[int, int]:
    """(layer id, num_layers) of a parameter name, as ``her2jax.train.optim.layer_ids``.

    ViT: patch embedding and CLS token 0, ``blocks.i`` i + 1, final norm and head depth + 1.
    ResNet (names under ``net.``): conv1 / bn1 0, ``layerN`` N, the head (``fc``) 5.
    """
    parts = name.split(".")
    if vit_depth is not None:
        num_layers = vit_depth + 1
        if parts[0] in ("patch_embed", "cls_token"):
            return 0, num_layers
        if parts[0] == "blocks":
            return int(parts[1]) + 1, num_layers
        if parts[0] in ("norm", "head"):
            return num_layers, num_layers
    else:
        parts = parts[1:] if parts[0] == "net" else parts
        if parts[0] in ("conv1", "bn1"):
            return 0, 5
        if parts[0].startswith("layer"):
            return int(parts[0].removeprefix("layer")), 5
        if parts[0] == "fc":
            return 5, 5
    raise ValueError(f"no layer id for the parameter {name}")


def learning_rate_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """optax's ``warmup_cosine_decay_schedule(0, lr, warmup, total, 0)`` / lr at ``step``."""
    if warmup_steps and step < warmup_steps:
        return step / warmup_steps
    if step >= total_steps:
        return 0.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, train: dict, *, vit_depth: int | None,
                   fused: bool) -> tuple[torch.optim.Optimizer,
                                                torch.optim.lr_scheduler.LRScheduler]:
    """AdamW in layer-wise-decay / weight-decay groups, and its warmup-cosine scheduler.

    Args:
      model: a ``ViT3D`` or ``resnet(...)``.
      train: the plain ``train`` section: learning_rate, b1, b2, weight_decay, layer_decay,
        warmup_steps, steps.
      vit_depth: the ViT's depth (None for a ResNet): selects the layer table.
      fused: ``fused=True`` (a few kernels per step; PyTorch raises where the device does not
        support it), else ``foreach=True``.

    Returns:
      (optimizer, scheduler); call ``scheduler.step()`` after every ``optimizer.step()``.
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        layer, num_layers = layer_id(name, vit_depth=vit_depth)
        scale = float(train["layer_decay"]) ** (num_layers - layer)
        decay = param.ndim >= 2 and name.split(".")[-1] not in ("cls_token", "pos_embed")
        groups.setdefault((scale, decay), []).append(param)
    lr = float(train["learning_rate"])
    return _adamw([{"params": params, "lr": lr * scale,
                    "weight_decay": float(train["weight_decay"]) if decay else 0.0}
                   for (scale, decay), params in sorted(groups.items())], train, fused=fused)


def _adamw(param_groups: list[dict], train: dict, *, fused: bool):
    """AdamW over ``param_groups`` with ``train``'s rate and betas, and its warmup-cosine
    ``LambdaLR``."""
    kwargs = {"fused": True} if fused else {"foreach": True}
    optimizer = torch.optim.AdamW(param_groups, lr=float(train["learning_rate"]),
                                  betas=(train["b1"], train["b2"]), **kwargs)

    def factor(step: int) -> float:
        return learning_rate_factor(step, warmup_steps=int(train["warmup_steps"]),
                                    total_steps=int(train["steps"]))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _update(loss: torch.Tensor, optimizer, scheduler, parameters, grad_clip: float) -> None:
    """Backward, clipping by global norm (0: off), the optimizer and the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip, foreach=True)
    optimizer.step()
    scheduler.step()


# ----------------------------------------------------------------------------------------------
# Steps


def augment(x: torch.Tensor, config: dict) -> torch.Tensor:
    """her2jax's on-device augmentation, per example: [B, C, D, H, W] float32 -> same.

    Flips of each spatial axis with probability 1/2, intensity x (1 + U(-scale, scale)),
    + U(-shift, shift), + N(0, noise²); all drawn on the device.
    """
    b = x.shape[0]
    shape = (b, 1, 1, 1, 1)
    if config.get("flips"):
        flips = torch.rand(b, 3, device=x.device) < 0.5
        for axis in range(3):
            x = torch.where(flips[:, axis].view(shape), x.flip(2 + axis), x)
    if config.get("scale"):
        x = x * (1 + (2 * torch.rand(shape, device=x.device) - 1) * config["scale"])
    if config.get("shift"):
        x = x + (2 * torch.rand(shape, device=x.device) - 1) * config["shift"]
    if config.get("noise"):
        x = x + config["noise"] * torch.randn_like(x)
    return x


class TrainStep:
    """One optimisation step of ``model`` on a device batch; returns the loss (no host sync).

    Args:
      model: the module to train (its ``forward`` gives [B, K] logits); may be a
        ``torch.compile`` d module of the one the optimizer holds.
      optimizer, scheduler: from :func:`make_optimizer`.
      parameters: the trained parameters (for clipping).
      augment_config: flips / scale / shift / noise.
      grad_clip: clip by global norm (0: off).
      class_weights: [K] float32 cross-entropy weights on the device.
      autocast_dtype: ``torch.bfloat16`` for mixed precision, or None.
      label_smoothing: as ``F.cross_entropy`` (= optax.smooth_labels' epsilon).
    """

    def __init__(self, model: Callable, optimizer, scheduler, parameters, *,
                 augment_config: dict, grad_clip: float, class_weights: torch.Tensor,
                 autocast_dtype: torch.dtype | None, label_smoothing: float = 0.0):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.parameters = list(parameters)
        self.augment_config, self.grad_clip = augment_config, grad_clip
        self.class_weights, self.autocast_dtype = class_weights, autocast_dtype
        self.label_smoothing = label_smoothing

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """image: [B, C, D, H, W] float16; label: [B] int64. Returns the loss (a tensor)."""
        x = augment(image.float(), self.augment_config)
        with torch.autocast(image.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), label, weight=self.class_weights,
                               label_smoothing=self.label_smoothing)
        _update(loss, self.optimizer, self.scheduler, self.parameters, self.grad_clip)
        return loss.detach()


class FeatureStep:
    """Eval-mode forward: [B, C, D, H, W] float16 -> (probabilities [B, K], features [B, F])."""

    def __init__(self, features: Callable, head: Callable, *,
                 autocast_dtype: torch.dtype | None):
        self.features, self.head, self.autocast_dtype = features, head, autocast_dtype

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(), torch.autocast(
                image.device.type, dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None):
            features = self.features(image.float())
            logits = self.head(features)
            return torch.softmax(logits.float(), dim=-1), features


# ----------------------------------------------------------------------------------------------
# MoCo v3 pretraining


def moco_mlp(dims: Sequence[int]) -> nn.Sequential:
    """MoCo v3's ``_build_mlp`` (her2jax ``moco.MLP``): ``Linear(bias=False) -> BatchNorm1d ->
    ReLU`` per hidden layer, the last ``Linear(bias=False) -> BatchNorm1d(affine=False)``."""
    layers: list[nn.Module] = []
    last = len(dims) - 2
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b, bias=False))
        layers.append(nn.BatchNorm1d(b, affine=i < last))
        if i < last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MoCoV3(nn.Module):
    """The query network (``encoder`` -> ``projector`` -> ``predictor``) and its momentum copy
    (``key_encoder`` -> ``key_projector``, no gradient), as ``her2jax.train.pretrain``.

    Args:
      encoder: a ``ViT3D`` (its ``features``: the final-norm CLS token); its classification
        ``head`` is removed (her2jax's query network holds the encoder alone).
      features: the encoder's feature width.
      dim, mlp_dim: the heads' output and hidden widths; the projector has 3 layers.
      freeze_patch_embed: MoCo v3's stop-gradient on the random patch projection.
    """

    def __init__(self, encoder: ViT3D, *, features: int, dim: int, mlp_dim: int,
                 freeze_patch_embed: bool = True):
        super().__init__()
        import copy

        encoder.head = nn.Identity()
        self.encoder = encoder
        self.projector = moco_mlp((features, mlp_dim, mlp_dim, dim))
        self.predictor = moco_mlp((dim, mlp_dim, dim))
        self.key_encoder = copy.deepcopy(encoder)
        self.key_projector = copy.deepcopy(self.projector)
        for p in [*self.key_encoder.parameters(), *self.key_projector.parameters()]:
            p.requires_grad_(False)
        if freeze_patch_embed:
            for p in self.encoder.patch_embed.parameters():
                p.requires_grad_(False)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.encoder.features(x)))

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_projector(self.key_encoder.features(x))

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """``key <- m key + (1 - m) query`` (parameters only, as her2jax's momentum tree)."""
        pairs = [(k, q) for k, q in zip(
            [*self.key_encoder.parameters(), *self.key_projector.parameters()],
            [*self.encoder.parameters(), *self.projector.parameters()], strict=True)]
        keys = [k for k, _ in pairs]
        torch._foreach_mul_(keys, m)
        torch._foreach_add_(keys, [q for _, q in pairs], alpha=1.0 - m)


def momentum_at(step: int, total: int, base: float) -> float:
    """MoCo v3's cosine momentum schedule (her2jax ``moco.momentum_at``)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1))) * (1.0 - base)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's ``ctr``: CE(q k^T / T, arange) x 2T over L2-normalised rows (one device)."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    logits = q @ k.T / temperature
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device)) * 2 * temperature


def random_views(x: torch.Tensor, views: dict) -> torch.Tensor:
    """One augmented view per example of [B, C, D, H, W] float32, the work of her2jax's
    ``pretrain.one_view``: a random resized crop (a box of ``crop_scale`` of the volume with
    per-axis aspect ratios in ``crop_ratio``, resampled trilinearly to the full grid by
    ``F.grid_sample``), flips, intensity scale / shift, a separable 5-tap Gaussian blur and
    Gaussian noise, each with its probability, all drawn on the device."""
    b, device = x.shape[0], x.device
    lo, hi = views["crop_scale"]
    scale = lo + (hi - lo) * torch.rand(b, 1, device=device)
    r_lo, r_hi = math.log(views["crop_ratio"][0]), math.log(views["crop_ratio"][1])
    log_ratio = r_lo + (r_hi - r_lo) * torch.rand(b, 3, device=device)
    log_ratio = log_ratio - log_ratio.mean(dim=1, keepdim=True)
    side = (scale ** (1 / 3) * log_ratio.exp()).clamp(0, 1)          # share of each axis
    start = torch.rand(b, 3, device=device) * (1 - side)
    centre = 2 * (start + side / 2) - 1                              # in [-1, 1]
    if views.get("flips"):
        side = side * torch.where(torch.rand(b, 3, device=device) < 0.5, -1.0, 1.0)
    # affine_grid's (x, y, z) are the last, middle and first spatial axes (W, H, D).
    theta = torch.zeros(b, 3, 4, device=device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 2, 2] = side[:, 2], side[:, 1], side[:, 0]
    theta[:, 0, 3], theta[:, 1, 3], theta[:, 2, 3] = centre[:, 2], centre[:, 1], centre[:, 0]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    shape = (b, 1, 1, 1, 1)
    x = x * (1 + (2 * torch.rand(shape, device=device) - 1) * views["scale"])
    x = x + (2 * torch.rand(shape, device=device) - 1) * views["shift"]
    s_lo, s_hi = views["blur_sigma"]
    sigma = s_lo + (s_hi - s_lo) * torch.rand(b, 1, device=device)
    taps = torch.arange(-2, 3, device=device, dtype=torch.float32)
    w = torch.exp(-0.5 * (taps / sigma) ** 2)
    w = w / w.sum(dim=1, keepdim=True)                               # [B, 5]
    blurred = x
    c = x.shape[1]
    for axis in range(3):
        kernel_shape = [1, 1, 1]
        kernel_shape[axis] = 5
        pad = [0] * 6
        pad[4 - 2 * axis: 6 - 2 * axis] = [2, 2]
        # One group per (example, channel): each example's own kernel.
        kernel = w.repeat_interleave(c, dim=0).view(b * c, 1, *kernel_shape)
        padded = F.pad(blurred.reshape(1, b * c, *x.shape[2:]), pad, mode="replicate")
        blurred = F.conv3d(padded, kernel, groups=b * c).view_as(x)
    x = torch.where(torch.rand(shape, device=device) < views["blur_prob"], blurred, x)
    noise_on = torch.rand(shape, device=device) < views["noise_prob"]
    return x + noise_on * views["noise"] * torch.randn_like(x)


class PretrainStep:
    """One MoCo v3 step (her2jax ``pretrain.make_pretrain_step`` on one device): two views,
    the momentum update, the key network on both views, the query network's symmetric loss,
    backward, AdamW and the schedule; returns the loss (no host sync).

    Args:
      moco: a :class:`MoCoV3`.
      optimizer, scheduler: over the query network's trainable parameters (decay on kernels).
      views: the ``pretrain`` view settings.
      temperature, base_momentum, total_steps: MoCo v3's T, m0 and T_steps.
      autocast_dtype: ``torch.bfloat16`` for mixed precision, or None.
      grad_clip: clip by global norm (0: off).
      query: ``moco.query`` or a ``torch.compile`` d version of it.
    """

    def __init__(self, moco: MoCoV3, optimizer, scheduler, *, views: dict, temperature: float,
                 base_momentum: float, total_steps: int, autocast_dtype: torch.dtype | None,
                 grad_clip: float = 0.0, query: Callable | None = None):
        self.moco, self.optimizer, self.scheduler = moco, optimizer, scheduler
        self.views, self.temperature = views, temperature
        self.base_momentum, self.total_steps = base_momentum, total_steps
        self.autocast_dtype, self.grad_clip = autocast_dtype, grad_clip
        self.trained = [p for p in moco.parameters() if p.requires_grad]
        self.query = query or moco.query
        self.step = 0

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float()
        x1, x2 = random_views(x, self.views), random_views(x, self.views)
        self.moco.momentum_update(momentum_at(self.step, self.total_steps, self.base_momentum))
        with torch.autocast(image.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            k1, k2 = self.moco.key(x1), self.moco.key(x2)
            q1, q2 = self.query(x1), self.query(x2)
        loss = (contrastive_loss(q1, k2, self.temperature)
                + contrastive_loss(q2, k1, self.temperature))
        _update(loss, self.optimizer, self.scheduler, self.trained, self.grad_clip)
        self.step += 1
        return loss.detach()


def make_pretrain_optimizer(moco: MoCoV3, train: dict, *, fused: bool):
    """AdamW over the query network's trainable parameters, weight decay on kernels (ndim >=
    2, not the CLS token), the warmup-cosine schedule: her2jax ``optim.make_plain_optimizer``."""
    decay, no_decay = [], []
    for name, param in [*moco.encoder.named_parameters(), *moco.projector.named_parameters(),
                        *moco.predictor.named_parameters()]:
        if param.requires_grad:
            (decay if param.ndim >= 2 and name != "cls_token" else no_decay).append(param)
    return _adamw([{"params": decay, "weight_decay": float(train["weight_decay"])},
                   {"params": no_decay, "weight_decay": 0.0}], train, fused=fused)
