"""Self-supervised pretraining of the encoder with MoCo v3: ``her2jax --mode=pretrain``.

The same engine as training (jit + shard_map over the ``data`` mesh, the input order a pure
function of (seed, step), orbax checkpoints, SIGTERM / Ctrl-C saves, a NaN guard, several
processes), with MoCo v3's step (Chen, Xie and He, 2021):

1. two views of every volume, augmented on the device (:func:`two_views`: a 3D random resized
   crop, flips, intensity scale and shift, Gaussian noise and blur, each drawn per example from
   ``fold_in(fold_in(rng, step), example index)``, so any device count sees the same views);
2. the momentum (key) network moves first, ``key <- m key + (1 - m) query`` with
   ``m = 1 - 0.5 (1 + cos(pi t / T)) (1 - m0)`` (:func:`moco.momentum_at`), then embeds both
   views; its outputs are gathered over the ``data`` axis (every device's keys);
3. the query network's loss is MoCo v3's symmetric contrastive loss
   ``ctr(q1, k2) + ctr(q2, k1)``, ``ctr(q, k) = CE(q k^T / T, positives) * 2T`` over the
   L2-normalised outputs, where each query's positive is its own example's key among all
   keys of the global batch (:func:`contrastive_loss`); the loss is the global mean, so its
   gradient is the global one (shard_map's transpose sums it; no further averaging);
4. AdamW on the query network; with ``pretrain.freeze_patch_embed`` (ViT) the patch
   projection stays at its random initialisation (MoCo v3's stop-gradient on it).

Every BatchNorm of the heads averages its statistics over the ``data`` axis (SyncBatchNorm).

The encoder is the config's ViT or ResNet, or, with ``model.encoder='none'``, the tumour-region
network (``model.roi_pool``; :func:`encoder_kind`), pretrained with MoCo's CNN heads.

Data: every case of the training centres of any prepared dataset, labelled or not. The run's
monitor: the contrastive loss per logged step, and every ``train.eval_every`` steps a kNN
macro AUC (cosine, k = ``pretrain.knn_k``, temperature 0.07) of the query encoder's features
of the dataset's labelled validation cases against its labelled training cases (skipped
when the dataset holds fewer than two classes there).

With ``pretrain.export='best_knn'`` (or ``train.early_stop_patience`` > 0) every monitored
step that beats the kept kNN macro AUC is saved to ``checkpoints/best``; the patience counts
monitor evaluations without a better one, and a resumed run continues the count (a run that
stopped early stays stopped).

Output: ``WORKDIR/encoder/``, a directory ``--config.model.pretrained=`` accepts exactly like
a ``her2jax-port`` output (``port.json`` + ``state/``): the query encoder of the last step, or
with ``pretrain.export='best_knn'`` of the best monitored one (``port.json``'s ``checkpoint``
names the checkpoint it came from).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from her2jax import treepaths
from her2jax.data import pipeline
from her2jax.errors import Her2jaxError
from her2jax.models import factory, moco, port, roi_pool
from her2jax.train import checkpoint as checkpoint_lib
from her2jax.train import checks, inference, logger, optim
from her2jax.train import state as state_lib
from her2jax.train import step as step_lib
from her2jax.train.state import TrainState

AXIS = step_lib.AXIS
ENCODER_DIR = "encoder"
SOURCE = "her2jax-pretrain"
KNN_TEMPERATURE = 0.07
EXPORTS = ("last", "best_knn")


# ---------------------------------------------------------------- the views


@dataclasses.dataclass(frozen=True)
class Views:
    """What :func:`two_views` draws (``pretrain`` settings)."""

    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.333)
    flips: bool = True
    scale: float = 0.2
    shift: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    blur_prob: float = 0.5
    noise: float = 0.1
    noise_prob: float = 0.5
    mask_channels: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, pretrain, channels=()) -> Views:
        return cls(crop_scale=tuple(map(float, pretrain.crop_scale)),
                   crop_ratio=tuple(map(float, pretrain.crop_ratio)),
                   flips=bool(pretrain.flips), scale=float(pretrain.scale),
                   shift=float(pretrain.shift),
                   blur_sigma=tuple(map(float, pretrain.blur_sigma)),
                   blur_prob=float(pretrain.blur_prob), noise=float(pretrain.noise),
                   noise_prob=float(pretrain.noise_prob),
                   mask_channels=step_lib.mask_channels(channels))


def _crop_weights(shape: tuple[int, int, int], key: jax.Array,
                  views: Views) -> list[jax.Array]:
    """The per-axis [n, n] trilinear sampling matrices of a random box of ``crop_scale`` of a
    volume of ``shape`` (per-axis aspect ratios in ``crop_ratio``), resampled to the full grid.

    The sampling grid is axis-aligned, so trilinear interpolation is separable: one small
    matrix per axis, applied as three matmuls (a 3D gather of 8 neighbours per voxel, as
    map_coordinates does, took 63 % of a CPU pretraining step)."""
    size = jnp.asarray(shape, jnp.float32)
    k_scale, k_ratio, k_place = jax.random.split(key, 3)
    scale = jax.random.uniform(k_scale, (), minval=views.crop_scale[0],
                               maxval=views.crop_scale[1])
    log_ratio = jax.random.uniform(k_ratio, (3,), minval=math.log(views.crop_ratio[0]),
                                   maxval=math.log(views.crop_ratio[1]))
    log_ratio = log_ratio - log_ratio.mean()          # the box keeps its volume
    side = jnp.clip(scale ** (1 / 3) * jnp.exp(log_ratio), 0.0, 1.0)   # share of each axis
    start = jax.random.uniform(k_place, (3,)) * (1.0 - side)
    # Voxel centres of the output grid mapped into the box (align-corners-free sampling).
    return [_linear_weights(start[a] * size[a] + (jnp.arange(shape[a]) + 0.5) * side[a] - 0.5,
                            shape[a]) for a in range(3)]


def _along_axes(x: jax.Array, weights: list[jax.Array]) -> jax.Array:
    """``x`` [D, H, W, C] with axis a replaced by ``weights[a] @ x`` along it."""
    for a in range(3):
        x = jnp.moveaxis(jnp.tensordot(weights[a], x, axes=([1], [a]),
                                       precision=lax.Precision.HIGHEST), 0, a)
    return x


def _random_crop(x: jax.Array, key: jax.Array, views: Views) -> jax.Array:
    """A box of ``crop_scale`` of the volume at a random place, resampled trilinearly to the
    full grid ([D, H, W, C])."""
    return _along_axes(x, _crop_weights(x.shape[:3], key, views))


def _linear_weights(coords: jax.Array, n: int) -> jax.Array:
    """[len(coords), n] weights of 1D linear interpolation at ``coords`` (voxel units) over
    ``n`` samples, edges repeated (``map_coordinates(order=1, mode='nearest')``'s rule)."""
    low = jnp.floor(coords)
    frac = (coords - low)[:, None]
    low = low.astype(jnp.int32)
    first = jax.nn.one_hot(jnp.clip(low, 0, n - 1), n, dtype=jnp.float32)
    second = jax.nn.one_hot(jnp.clip(low + 1, 0, n - 1), n, dtype=jnp.float32)
    return (1.0 - frac) * first + frac * second


def _blur_weights(sigma: jax.Array, n: int) -> jax.Array:
    """[n, n]: a 5-tap Gaussian of ``sigma`` voxels along one axis, edges repeated
    (``scipy.ndimage.correlate1d(mode='nearest')``'s rule) as a matrix."""
    taps = jnp.arange(-2, 3, dtype=jnp.float32)
    w = jnp.exp(-0.5 * (taps / sigma) ** 2)
    w = w / w.sum()
    source = jnp.clip(jnp.arange(n)[:, None] + jnp.arange(-2, 3)[None, :], 0, n - 1)
    return jnp.einsum("t,itn->in", w, jax.nn.one_hot(source, n, dtype=jnp.float32))


def one_view(x: jax.Array, key: jax.Array, views: Views) -> jax.Array:
    """One augmented view of one [D, H, W, C] volume: crop, flips, intensity scale and shift,
    blur, noise (MoCo's order); mask channels are cropped and flipped only."""
    k_crop, k_flip, k_scale, k_shift, k_blur, k_noise = jax.random.split(key, 6)
    crop = _crop_weights(x.shape[:3], k_crop, views)
    sampling = crop
    if views.blur_prob:
        # The blur is linear, symmetric and keeps constants, so it commutes with the flips and
        # the intensity scale and shift between the crop and it: folded into the crop's
        # per-axis matrices ([n, n] products) it costs nothing per voxel (filtering each view
        # took ~30 % of a CPU pretraining step of the small networks).
        k_on, k_sigma = jax.random.split(k_blur)
        sigma = jax.random.uniform(k_sigma, (), minval=views.blur_sigma[0],
                                   maxval=views.blur_sigma[1])
        on = jax.random.bernoulli(k_on, views.blur_prob)
        sampling = [jnp.where(on, jnp.matmul(_blur_weights(sigma, m.shape[0]), m,
                                             precision=lax.Precision.HIGHEST), m)
                    for m in crop]
    masks = np.asarray(views.mask_channels, np.int32)
    moved = _along_axes(x[..., masks], crop) if masks.size else None
    x = _along_axes(x, sampling)
    if views.flips:
        flips = jax.random.bernoulli(k_flip, 0.5, (3,))
        for axis in range(3):
            x = jnp.where(flips[axis], jnp.flip(x, axis), x)
            if moved is not None:
                moved = jnp.where(flips[axis], jnp.flip(moved, axis), moved)
    if views.scale:
        x = x * (1 + jax.random.uniform(k_scale, (), minval=-views.scale, maxval=views.scale))
    if views.shift:
        x = x + jax.random.uniform(k_shift, (), minval=-views.shift, maxval=views.shift)
    if views.noise and views.noise_prob:
        k_on, k_n = jax.random.split(k_noise)
        x = x + jnp.where(jax.random.bernoulli(k_on, views.noise_prob), views.noise, 0.0) \
            * jax.random.normal(k_n, x.shape)
    if moved is not None:
        x = x.at[..., masks].set(moved)
    return x


def two_views(image: jax.Array, keys: jax.Array, views: Views) -> tuple[jax.Array, jax.Array]:
    """([B, D, H, W, C], [B, D, H, W, C]): two independent views of every volume; example
    b's draws come from ``keys[b]`` (streams 0 and 1)."""
    image = image.astype(jnp.float32)
    k1 = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    k2 = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    make = jax.vmap(lambda x, k: one_view(x, k, views))
    return make(image, k1), make(image, k2)


# ---------------------------------------------------------------- the loss


def contrastive_loss(q: jax.Array, k_all: jax.Array, offset, temperature: float) -> jax.Array:
    """MoCo v3's ``ctr`` summed over the local queries: ``sum_i CE(q_i . k / T, offset + i) *
    2T`` with q and k L2-normalised.

    Args:
      q: [n, d] this device's queries.
      k_all: [N, d] the keys of the whole global batch (gathered over devices, in device
        order), so query i's positive is key ``offset + i``.
      offset: this device's first example's position in the global batch.
      temperature: T.
    """
    q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    k = k_all / jnp.maximum(jnp.linalg.norm(k_all, axis=-1, keepdims=True), 1e-12)
    logits = (q @ k.T) / temperature
    positives = offset + jnp.arange(q.shape[0])
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(log_p, positives[:, None], axis=-1)) * 2 * temperature


# ---------------------------------------------------------------- networks, state, step


def encoder_kind(config) -> str:
    """What pretraining trains as the encoder: ``vit3d``, ``resnet3d``, or ``roi_pool`` (the
    tumour-region network alone, ``model.encoder='none'``; MoCo's CNN heads: a 2-layer
    projector, a predictor without a final BatchNorm)."""
    model_config = config.model
    if model_config.encoder in ("vit3d", "resnet3d"):
        return model_config.encoder
    if model_config.encoder == "none" and model_config.get("roi_pool", {}).get("hidden", 0):
        return "roi_pool"
    raise Her2jaxError(f"pretraining needs an encoder (vit3d or resnet3d) or the tumour-region "
                       f"network (encoder 'none' with model.roi_pool.hidden > 0), got "
                       f"{model_config.encoder!r}", key="model.encoder")


def build_query(config, *, rngs: nnx.Rngs | None = None,
                bn_axis_name: str | None = None) -> moco.Query:
    """The query network: the encoder of ``config.model`` (loading ``model.pretrained`` as
    training does), a projector and a predictor (``config.pretrain``)."""
    model_config = config.model
    kind = encoder_kind(config)
    rngs = rngs or nnx.Rngs(model_config.seed)
    classifier = factory.build_model(config, rngs=rngs, bn_axis_name=bn_axis_name)
    # The tumour-region network alone (encoder 'none') is pretrained as the encoder.
    encoder = classifier.roi if kind == "roi_pool" else classifier.encoder
    p = config.pretrain
    projector = moco.MLP(moco.projector_dims(kind, encoder.features_dim, p.mlp_dim, p.dim),
                         rngs=rngs, bn_axis_name=bn_axis_name)
    predictor = moco.MLP((p.dim, p.mlp_dim, p.dim), last_bn=moco.predictor_last_bn(kind),
                         rngs=rngs, bn_axis_name=bn_axis_name)
    query = moco.Query(encoder, projector, predictor)
    return query


def key_view(query: moco.Query) -> moco.Key:
    """The key network's structure (the query's encoder and projector)."""
    return moco.Key(query.encoder, query.projector)


def _frozen(path: tuple) -> bool:
    return len(path) > 1 and path[0] == "encoder" and path[1] == "patch_embed"


def make_optimizer(config, params, *, total_steps: int) -> optax.GradientTransformation:
    """AdamW (``train`` settings: lr with warmup + cosine, weight decay on kernels, clipping)
    of the query network; with ``pretrain.freeze_patch_embed`` the ViT's patch projection
    gets no update (and no decay)."""
    return optim.make_plain_optimizer(
        config.train, params, total_steps=total_steps,
        frozen=_frozen if config.pretrain.freeze_patch_embed else None)


def create_state(query: moco.Query, optimizer, seed: int, *,
                 key_encoder: nnx.State | None = None,
                 key_projector: dict | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """The initial state; ``momentum`` holds the key network's parameters: the query's
    encoder and projector, copied, or ``key_encoder`` (a port's momentum encoder,
    :func:`port_key_encoder`) for the encoder and ``key_projector`` (a port's key projector,
    :func:`load_port_heads`) for the projector."""
    graphdef, state = state_lib.create(query, optimizer, seed)
    momentum = nnx.State({name: jax.tree.map(jnp.copy, state.params[name])
                          for name in ("encoder", "projector")})
    if key_encoder is not None:
        momentum["encoder"] = key_encoder
    if key_projector is not None:
        wanted = nnx.to_pure_dict(momentum["projector"])
        nnx.replace_by_pure_dict(momentum["projector"], _common(key_projector, wanted))
    return graphdef, state.replace(momentum=momentum)


def _common(tree: dict, like: dict) -> dict:
    """The entries of the nested dict ``tree`` that ``like`` also has."""
    return {k: _common(v, like[k]) if isinstance(v, dict) else v
            for k, v in tree.items() if k in like}


def load_port_heads(query: moco.Query, config) -> dict | None:
    """Loads ``model.pretrained``'s MoCo v3 projector and predictor (parameters and BatchNorm
    statistics) into ``query`` when the port holds them and they have the config's widths
    and layers; returns the key projector's state for :func:`create_state` (None when the
    port has none). Heads of other widths are left alone, with a warning: the run's heads
    start fresh."""
    directory = config.model.pretrained
    if not port.holds(directory, port.HEADS_DIR):
        return None
    stored = port.read_port(directory).get("moco_heads") or {}
    target = {name: nnx.to_pure_dict(nnx.state(getattr(query, name)))
              for name in ("projector", "predictor")}
    ours = {name: port.mlp_shape(target[name]) for name in target}
    if any(stored.get(name) != ours[name] for name in ours):
        def describe(shapes):
            return ", ".join(f"{k} {'-'.join(map(str, v['widths']))}"
                             f"{'' if v['last_bn'] else ' (no last BatchNorm)'}"
                             for k, v in shapes.items())
        logging.warning("the port's MoCo v3 heads (%s) are not this run's (%s, from "
                        "pretrain.dim / mlp_dim and the encoder): the projector and predictor "
                        "start fresh", describe(stored), describe(ours))
        return None
    if "key_projector" in stored:
        target["key_projector"] = target["projector"]
    heads = port.read_moco_heads(directory, target)
    for name in ("projector", "predictor"):
        module = getattr(query, name)
        state = nnx.state(module)
        nnx.replace_by_pure_dict(state, heads[name])
        nnx.update(module, state)
    logging.info("the projector and predictor start from the port's MoCo v3 heads%s",
                 " (and the key projector from its momentum encoder's)"
                 if "key_projector" in heads else "")
    return heads.get("key_projector")


def port_key_encoder(config) -> nnx.State | None:
    """The parameters of ``model.pretrained``'s MoCo momentum encoder (FM-BCMRI's files hold
    one), to continue pretraining with it as the key encoder; None when the port has none
    (the key encoder then starts as a copy of the query's)."""
    if not port.holds(config.model.pretrained, port.MOMENTUM_DIR):
        return None
    encoder = nnx.eval_shape(lambda: factory.build_encoder(config, rngs=nnx.Rngs(0),
                                                           bn_axis_name=AXIS))
    port.load_pretrained(encoder, config.model.pretrained, state_dir=port.MOMENTUM_DIR)
    logging.info("the key encoder starts from the port's momentum encoder")
    return nnx.state(encoder, nnx.Param)


def make_pretrain_step(graphdef: nnx.GraphDef, optimizer, mesh, *, views: Views,
                       temperature: float, base_momentum: float, total_steps: int):
    """``jit(shard_map(step))``: ``(state, batch) -> (state, metrics)``, state donated.

    The batch: image [B, D, H, W, C] and index [B] (global example index), sharded over
    ``data``; every row is a real example (training batches are full).
    """

    def per_device(state: TrainState, batch: dict):
        keys = step_lib.example_keys(state.rng, state.step, batch["index"])
        x1, x2 = two_views(batch["image"], keys, views)
        n_local = x1.shape[0]
        n_global = lax.psum(1, AXIS) * n_local
        offset = lax.axis_index(AXIS) * n_local

        # 1-2. The momentum network moves, then embeds both views (no gradient).
        m = moco.momentum_at(state.step, total_steps, base_momentum)
        momentum = moco.momentum_update(state.momentum, state.params, m)
        key_net = nnx.merge(graphdef, nnx.State({**state.params, **momentum}), state.rest,
                            copy=True)
        key_net.train()
        key_model = key_view(key_net)
        k1 = lax.stop_gradient(lax.all_gather(key_model(x1), AXIS, tiled=True))
        k2 = lax.stop_gradient(lax.all_gather(key_model(x2), AXIS, tiled=True))

        # 3. The query network's global loss.
        def global_loss(params):
            model = nnx.merge(graphdef, params, state.rest, copy=True)
            model.train()
            q1, q2 = model(x1), model(x2)
            local = (contrastive_loss(q1, k2, offset, temperature)
                     + contrastive_loss(q2, k1, offset, temperature))
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return lax.psum(local, AXIS) / n_global, rest

        (loss, rest), grads = jax.value_and_grad(global_loss, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "momentum": m, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, rest=rest,
                             opt_state=opt_state, momentum=momentum), metrics

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)),
                            out_specs=(P(), P()), check_vma=True)
    return jax.jit(sharded, donate_argnums=0)


# ---------------------------------------------------------------- monitor and export


def knn_probs(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, *, k: int,
              num_classes: int, temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """[Q, K] class probabilities of a weighted kNN on cosine similarity (each of the k
    nearest bank features votes for its label with weight exp(similarity / temperature))."""
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    similarity = unit(queries) @ unit(bank).T
    k = min(int(k), similarity.shape[1])
    nearest = np.argsort(-similarity, axis=1)[:, :k]
    votes = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
    scores = np.zeros((len(queries), num_classes))
    for c in range(num_classes):
        scores[:, c] = np.sum(votes * (np.asarray(bank_labels)[nearest] == c), axis=1)
    return scores / np.maximum(scores.sum(axis=1, keepdims=True), 1e-300)


class _Monitor:
    """The kNN macro AUC of the query encoder's features: the labelled validation cases
    against the labelled training cases of the dataset (None when it cannot be measured)."""

    def __init__(self, dataset: pipeline.Dataset, config, mesh, graphdef: nnx.GraphDef):
        from her2jax.evaluate import metrics

        self._metrics = metrics
        self.dataset, self.mesh = dataset, mesh
        self.k = int(config.pretrain.knn_k)
        self.batch_size = inference.eval_batch_size(config)
        splits = pipeline.select_splits(dataset, config.data)
        self.bank, self.queries = splits["train"], splits["val"]
        self.usable = (len(self.queries) > 0 and len(set(self.bank.labels.tolist())) >= 2
                       and len(set(self.queries.labels.tolist())) >= 2)
        if not self.usable:
            logging.info("no kNN monitor: the dataset's training centres hold fewer than two "
                         "labelled classes in train or val")

        @jax.jit
        def features(params, rest, image):
            model = nnx.merge(graphdef, params, rest, copy=True)
            model.eval()
            f = model.features(image.astype(jnp.float32))
            return jnp.zeros((f.shape[0], 1), jnp.float32), f

        self._features = features

    def __call__(self, state: TrainState) -> float | None:
        if not self.usable:
            return None

        def fn(image):
            p, f = self._features(state.params, state.rest, image)
            return inference.gather(p), inference.gather(f)

        bank = inference.predict_with(fn, self.dataset, self.bank, self.mesh, self.batch_size)[1]
        queries = inference.predict_with(fn, self.dataset, self.queries, self.mesh,
                                         self.batch_size)[1]
        names = self.queries.class_names
        probs = knn_probs(bank, self.bank.labels, queries, k=self.k, num_classes=len(names))
        return self._metrics.summarize(self.queries.labels, probs, names,
                                       n_boot=0)["macro_auc"]["value"]


def architecture_of(config) -> dict:
    """The encoder's constructor arguments, as ``port.json`` records them."""
    m, recipe = config.model, config.data.recipe
    if encoder_kind(config) == "roi_pool":
        return dict(kind="roi_pool", in_channels=len(recipe.channels),
                    mask_channel=factory.mask_channel(recipe, "tumour-region pooling",
                                                      "model.roi_pool.hidden"),
                    hidden=int(m.roi_pool.hidden),
                    rim_voxels=list(roi_pool.shells_of(m.roi_pool.rim_voxels)),
                    standardize=bool(m.roi_pool.get("standardize", False)))
    if m.encoder == "vit3d":
        from her2jax.models import vit3d

        size = vit3d.VIT_SIZES[m.vit.size]
        return dict(kind="vit3d", in_channels=len(recipe.channels),
                    input_shape=[int(s) for s in recipe.shape], patch_size=int(m.vit.patch_size),
                    embed_dim=size["embed_dim"], depth=size["depth"], mlp_ratio=4.0,
                    num_heads=int(m.vit.get("num_heads", 0) or size["num_heads"]))
    r = m.resnet
    return dict(kind="resnet3d", depth=int(r.depth), in_channels=len(recipe.channels),
                shortcut=r.shortcut, bias_downsample=bool(r.bias_downsample),
                conv1_t_size=int(r.conv1_t_size), widen_factor=float(r.widen_factor),
                conv1_t_stride=int(r.conv1_t_stride), dilated=bool(r.get("dilated", False)))


def export_encoder(out: Path, config, graphdef: nnx.GraphDef, state: TrainState, *,
                   origin: str) -> port.PortReport:
    """Writes the query encoder of ``state`` as a port directory (``port.json`` + state)."""
    model = nnx.merge(graphdef, state.params, state.rest, copy=True)
    local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if hasattr(
        x, "addressable_data") else np.asarray(x), nnx.to_pure_dict(nnx.state(model.encoder)))
    architecture = architecture_of(config)
    names = sorted(treepaths.dotted(p) for p, _ in
                   jax.tree_util.tree_flatten_with_path(local)[0])
    report = port.PortReport(
        SOURCE, origin, "", architecture,
        {k: {"value": v, "from": "config (her2jax pretraining)"}
         for k, v in architecture.items()},
        names, ["projector", "predictor", "momentum network"], [], None)
    if jax.process_index() == 0:
        port.write_port(out, local, report)
    return report


# ---------------------------------------------------------------- the run


def check_pretrain_config(config) -> None:
    """The ``pretrain`` section's ranges, and the ``train`` settings pretraining cannot use."""
    p = config.get("pretrain")
    if p is None:
        raise Her2jaxError("the config has no pretrain section (start from "
                           "configs/pretrain_*.py)", key="pretrain")

    def need(ok: bool, key: str, what: str, value) -> None:
        if not ok:
            raise Her2jaxError(f"must be {what}, got {value!r}", key=f"pretrain.{key}")

    for key in ("dim", "mlp_dim", "knn_k"):
        need(isinstance(p[key], int) and p[key] >= 1, key, "a positive integer", p[key])
    need(p.temperature > 0, "temperature", "> 0", p.temperature)
    need(0 <= p.momentum < 1, "momentum", "in [0, 1)", p.momentum)
    lo, hi = p.crop_scale
    need(0 < lo <= hi <= 1, "crop_scale", "(low, high) with 0 < low <= high <= 1", p.crop_scale)
    lo, hi = p.crop_ratio
    need(0 < lo <= hi, "crop_ratio", "(low, high) with 0 < low <= high", p.crop_ratio)
    lo, hi = p.blur_sigma
    need(0 < lo <= hi, "blur_sigma", "(low, high) voxels with 0 < low <= high", p.blur_sigma)
    for key in ("blur_prob", "noise_prob"):
        need(0 <= p[key] <= 1, key, "a probability in [0, 1]", p[key])
    for key in ("scale", "shift", "noise"):
        need(p[key] >= 0, key, ">= 0", p[key])
    need(p.get("export", "last") in EXPORTS, "export", f"one of {', '.join(EXPORTS)}",
         p.get("export"))
    if config.train.grad_accum != 1:
        raise Her2jaxError("pretraining moves the momentum network every batch; gradient "
                           "accumulation is not supported (use a larger batch)",
                           key="train.grad_accum")
    if config.train.get("ema_decay", 0.0):
        raise Her2jaxError("pretraining keeps its own average (the momentum network); "
                           "ema_decay must be 0", key="train.ema_decay")
    if config.train.get("freeze_steps", 0):
        raise Her2jaxError("pretraining has no head to probe first; freeze_steps is for "
                           "fine-tuning and must be 0 here", key="train.freeze_steps")


def pretraining_split(dataset: pipeline.Dataset, data_config) -> pipeline.Split:
    """Every case of the training centres, labelled or not (labels -1 where unknown)."""
    test = tuple(data_config.test_centers)
    centers = tuple(data_config.train_centers) or tuple(c for c in dataset.centers
                                                        if c not in test)
    if not centers:
        raise Her2jaxError("no centre left to pretrain on", key="data.train_centers")
    return pipeline.centre_split(dataset, centers, data_config.scheme, name="pretrain",
                                 labelled_only=False)


def _last_logged(workdir: Path, split: str, key: str, step: int) -> float | None:
    """The last value of ``key`` that ``workdir/metrics.jsonl`` logged for ``split`` at or
    before ``step`` (None when there is none)."""
    values = [r[key] for r in logger.read_metrics(workdir)
              if r.get("split") == split and key in r and r.get("step", 0) <= step]
    return values[-1] if values else None


def run(config: ml_collections.ConfigDict, workdir, *, force: bool = False,
        progress: bool = True) -> dict:
    """Pretrains (or resumes) in ``workdir``; at the end writes ``workdir/encoder/``.

    Returns:
      ``{"steps", "stopped": 'done' | 'early_stop' | 'preempted' | 'interrupted', "encoder":
      path or None, "exported_step": the step whose query encoder it holds (or None),
      "loss": the last logged loss, "knn_macro_auc": the last monitor value}``.
    """
    from her2jax.train import loop

    workdir = Path(workdir)
    tc = config.train
    checks.check_run_config(config)
    check_pretrain_config(config)
    loop.check_batch(tc.batch_size, "train.batch_size")
    loop.check_batch(tc.eval_batch_size, "train.eval_batch_size")
    mesh = step_lib.make_mesh()
    dataset = pipeline.open_dataset(config.data.data_dir, config.data)
    split = pretraining_split(dataset, config.data)
    logging.info("pretraining on %d cases (%d labelled) of %s", len(split),
                 int((split.labels >= 0).sum()), ", ".join(sorted(set(split.centers))))
    total = tc.steps

    query = build_query(config, bn_axis_name=AXIS)
    key_projector = load_port_heads(query, config)
    optimizer = make_optimizer(config, nnx.state(query, nnx.Param), total_steps=total)
    graphdef, state = create_state(query, optimizer, tc.seed,
                                   key_encoder=port_key_encoder(config),
                                   key_projector=key_projector)
    del query
    state = jax.device_put(state, NamedSharding(mesh, P()))
    p = config.pretrain
    step_fn = make_pretrain_step(
        graphdef, optimizer, mesh, views=Views.from_config(p, config.data.recipe.channels),
        temperature=float(p.temperature), base_momentum=float(p.momentum), total_steps=total)
    monitor = _Monitor(dataset, config, mesh, graphdef)
    export = p.get("export", "last")
    patience = int(tc.early_stop_patience)
    keep_best = export == "best_knn" or patience > 0
    if keep_best and not monitor.usable:
        key, what = (("pretrain.export", "export='best_knn'") if export == "best_knn" else
                     ("train.early_stop_patience", "early stopping"))
        raise Her2jaxError(f"{what} needs the kNN monitor, and the dataset's training centres "
                           "hold fewer than two labelled classes in train or val", key=key)

    result = {"steps": 0, "stopped": "done", "encoder": None, "loss": None,
              "knn_macro_auc": None, "exported_step": None}
    with contextlib.ExitStack() as stack:
        run_config = loop.hold_workdir(stack, workdir, config, dataset.meta, force=force)
        checkpoints, state, start = loop.open_checkpoints(stack, workdir, tc, state)
        log = stack.enter_context(loop.RunLog(workdir, resume_step=start))
        batches = pipeline.device_batches(pipeline.train_batches(
            dataset, split, global_batch_size=tc.batch_size, seed=tc.seed, start_step=start,
            stop_step=total, process_index=jax.process_index(),
            process_count=jax.process_count(), worker_count=config.data.worker_count,
            prefetch=config.data.prefetch), mesh, ahead=config.data.get("device_prefetch", 2))
        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                   disable=not progress or jax.process_index() != 0)
        stack.callback(bar.close)
        preemption = stack.enter_context(loop.Preemption())
        window = (time.perf_counter(), start)
        since_best = loop.evaluations_since_best(start, checkpoints.best_step(), tc.eval_every,
                                                 total)
        if patience and since_best >= patience:
            result["stopped"] = "early_stop"
        for step in range(start, total if result["stopped"] == "done" else start):
            state, step_metrics = step_fn(state, next(batches))
            done = step + 1
            if done % tc.log_every == 0 or done == total:
                values, window = loop.log_step(log, done, step_metrics, window, tc.batch_size,
                                               what="pretraining")
                result["loss"] = values["loss"]
                bar.set_postfix(loss=f"{values['loss']:.3f}")
            bar.update()
            if done % tc.eval_every == 0 or done == total:
                knn = monitor(state)
                if knn is not None:
                    log.write(done, "val", {"knn_macro_auc": knn})
                    result["knn_macro_auc"] = knn
                if keep_best:
                    previous = checkpoints.best_metric()
                    if checkpoints.save_best(done, state, config=run_config,
                                             metric=float("nan") if knn is None else knn):
                        since_best = 0
                    elif previous is not None:
                        since_best += 1
                    if patience and since_best >= patience:
                        result["stopped"] = "early_stop"
            checkpoints.save_latest(done, state, config=run_config,
                                    force=done == total or result["stopped"] != "done"
                                    or preemption.requested)
            if preemption.requested or checkpoints.preempted:
                result["stopped"] = "interrupted" if preemption.interrupted else "preempted"
            if result["stopped"] != "done":
                break
        checkpoints.wait_until_finished()
        result["steps"] = int(jax.device_get(state.step))
        exported, origin = state, workdir / "checkpoints" / "latest" / str(result["steps"])
        if export == "best_knn" and result["stopped"] in ("done", "early_stop"):
            best = checkpoints.best_step()
            if best is None:   # every monitored kNN macro AUC was undefined (NaN)
                raise Her2jaxError("no monitored step to export: the kNN macro AUC was "
                                   "undefined at every evaluation (checkpoints/best is empty)",
                                   file=str(workdir))
            exported = checkpoints.restore_best(checkpoint_lib.abstract_like(state))
            origin = workdir / "checkpoints" / "best" / str(best)
    # A rerun of a finished (or nearly finished) run logs nothing new: its figures are the
    # last ones metrics.jsonl holds.
    for split, key in (("train", "loss"), ("val", "knn_macro_auc")):
        if result[key] is None:
            result[key] = _last_logged(workdir, split, key, result["steps"])
    if result["stopped"] in ("done", "early_stop"):
        export_encoder(workdir / ENCODER_DIR, config, graphdef, exported, origin=str(origin))
        result["encoder"] = str(workdir / ENCODER_DIR)
        result["exported_step"] = int(jax.device_get(exported.step))
    return result
