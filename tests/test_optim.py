"""The optimizer from the train config: schedule, layer-wise decay, weight-decay mask,
freezing, gradient accumulation and clipping.

Models are built abstractly (``nnx.eval_shape``); parameters and gradients are filled with
constants, so no random initialisation is compiled.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from her2jax.errors import Her2jaxError
from her2jax.models import heads, resnet3d, vit3d
from her2jax.train import optim

DEPTH = 2  # tiny ViT: num_layers = DEPTH + 1 = 3
TOTAL = 4


def _config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(
        optimizer="adamw", learning_rate=0.1, warmup_steps=0, weight_decay=0.05,
        momentum=0.9, nesterov=False, b1=0.9, b2=0.999, layer_decay=1.0, freeze="none",
        freeze_keep=0, grad_accum=1, grad_clip=0.0))
    config.update(overrides)
    return config


def _sgd(**overrides) -> ml_collections.ConfigDict:
    """Plain SGD: update = -lr(step) * scale * gradient."""
    return _config(**{"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, **overrides})


def _abstract_params(build) -> nnx.State:
    model = nnx.eval_shape(build)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return params


@pytest.fixture(scope="module")
def vit_params() -> nnx.State:
    return _abstract_params(lambda: heads.Classifier(
        vit3d.ViT3D(in_channels=1, input_shape=(16, 16, 16), patch_size=8, embed_dim=48,
                    depth=DEPTH, num_heads=2, rngs=nnx.Rngs(0)),
        heads.Head(48, 3, rngs=nnx.Rngs(0))))


@pytest.fixture(scope="module")
def resnet_params() -> nnx.State:
    return _abstract_params(lambda: heads.Classifier(
        resnet3d.ResNet3D(depth=10, in_channels=1, rngs=nnx.Rngs(0)),
        heads.Head(512, 3, rngs=nnx.Rngs(0))))


def _fill(abstract, value) -> nnx.State:
    # numpy, not jnp: eager jnp.full compiles one program per shape on CPU
    return jax.tree.map(lambda s: np.full(s.shape, value, s.dtype), abstract)


def _flat(tree) -> dict[tuple, object]:
    """{('encoder', 'blocks', 0, ..., 'kernel'): leaf} for a State (Param nodes dropped)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))
                     for k in path)
        out[keys[:-1] if keys[-1] == "value" else keys] = leaf
    return out


def _updates(tx, grads, params, steps=1):
    """Runs ``steps`` jitted updates with the same gradient; returns the list of updates."""
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    out = []
    for _ in range(steps):
        u, state = update(grads, state, params)
        out.append(_flat(u))
    return out


# ----------------------------------------------------------------------------------------------
# Schedule


def test_schedule_warmup_then_cosine_to_zero():
    schedule = optim.learning_rate_schedule(_config(learning_rate=1e-3, warmup_steps=10), 110)
    np.testing.assert_allclose(
        [schedule(s) for s in (0, 5, 10, 60, 110, 200)],
        [0.0, 5e-4, 1e-3, 5e-4, 0.0, 0.0], atol=1e-9)
    # no warmup: the peak at step 0
    no_warmup = optim.learning_rate_schedule(_config(learning_rate=1e-3), 100)
    np.testing.assert_allclose([no_warmup(0), no_warmup(50), no_warmup(100)],
                               [1e-3, 5e-4, 0.0], atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Layer ids and layer-wise decay


def test_layer_ids_vit(vit_params):
    ids = _flat(optim.layer_ids(vit_params))
    assert jax.tree.structure(optim.layer_ids(vit_params)) == jax.tree.structure(vit_params)
    assert ids[("encoder", "patch_embed", "proj", "kernel")] == 0
    assert ids[("encoder", "cls_token")] == 0
    assert ids[("encoder", "blocks", 0, "attn", "qkv", "kernel")] == 1
    assert ids[("encoder", "blocks", 1, "norm2", "scale")] == 2
    assert ids[("encoder", "norm", "bias")] == DEPTH + 1
    assert ids[("head", "fc", "kernel")] == DEPTH + 1
    assert set(ids.values()) == {0, 1, 2, 3}


def test_layer_ids_resnet(resnet_params):
    ids = _flat(optim.layer_ids(resnet_params))
    assert ids[("encoder", "conv1", "kernel")] == 0
    assert ids[("encoder", "bn1", "scale")] == 0
    assert ids[("encoder", "layer1", 0, "conv1", "kernel")] == 1
    assert ids[("encoder", "layer3", 0, "downsample", 1, "bias")] == 3
    assert ids[("encoder", "layer4", 0, "bn2", "bias")] == 4
    assert ids[("head", "fc", "bias")] == 5
    assert set(ids.values()) == {0, 1, 2, 3, 4, 5}


@pytest.mark.parametrize("layer_decay", [0.5, 0.75])
def test_layer_decay_scales_the_learning_rate_exactly(vit_params, layer_decay):
    config = _sgd(layer_decay=layer_decay)
    params = _fill(vit_params, 1.0)
    (update,) = _updates(optim.make_optimizer(config, params, total_steps=TOTAL),
                         _fill(vit_params, 1.0), params)
    lr = np.float32(optim.learning_rate_schedule(config, TOTAL)(0))

    def expected(layer):  # lr(step) * scale in float32, as the optimizer computes it
        return -(lr * np.float32(layer_decay ** (DEPTH + 1 - layer)))

    for path, layer in [(("encoder", "patch_embed", "proj", "kernel"), 0),
                        (("encoder", "cls_token"), 0),
                        (("encoder", "blocks", 0, "mlp", "fc1", "bias"), 1),
                        (("encoder", "blocks", 1, "attn", "proj", "kernel"), 2),
                        (("encoder", "norm", "scale"), 3),
                        (("head", "fc", "kernel"), 3)]:
        u = np.asarray(update[path])
        np.testing.assert_array_equal(u, np.full(u.shape, expected(layer), np.float32),
                                      err_msg=str(path))
    if layer_decay == 0.5:
        assert expected(0) == -lr * 0.5 ** 3 and expected(2) == -lr * 0.5


def _one_group_per_scale(config, params, layer_decay):
    """Layer-wise decay the textbook way (PyTorch parameter groups): one optax optimizer per
    layer scale with the schedule ``lr(step) * scale``, through ``optax.partition``."""
    schedule = optim.learning_rate_schedule(config, TOTAL)
    ids = optim.layer_ids(params)
    scales = {layer: layer_decay ** (DEPTH + 1 - layer) for layer in set(jax.tree.leaves(ids))}
    mask = optim.weight_decay_mask(params)

    def group(scale):
        lr = (lambda step: schedule(step) * scale) if scale != 1.0 else schedule
        if config.optimizer == "adamw":
            return optax.adamw(lr, b1=config.b1, b2=config.b2,
                               weight_decay=config.weight_decay, mask=mask)
        return optax.sgd(lr, momentum=config.momentum)

    tx = optax.partition({f"l{layer}": group(s) for layer, s in scales.items()},
                         jax.tree.map(lambda layer: f"l{layer}", ids))
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_layer_decay_is_bitwise_one_group_per_scale(vit_params, optimizer):
    """The single-optimizer layer decay gives, bit for bit, the parameters that one group per
    scale gives, over steps with random gradients, warmup, clipping and weight decay."""
    config = _config(optimizer=optimizer, layer_decay=0.65, warmup_steps=2, grad_clip=0.5,
                     weight_decay=0.05 if optimizer == "adamw" else 0.0)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), vit_params)
    grads = [jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), vit_params)
             for _ in range(TOTAL)]
    ours = optim.make_optimizer(config, params, total_steps=TOTAL)
    theirs = _one_group_per_scale(config, params, 0.65)

    def run(tx):
        @jax.jit
        def step(p, state, g):
            updates, state = tx.update(g, state, p)
            return optax.apply_updates(p, updates), state

        p, state = params, tx.init(params)
        for g in grads:
            p, state = step(p, state, g)
        return _flat(p)

    a, b = run(ours), run(theirs)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]),
                                      err_msg=str(path))
    assert not np.array_equal(np.asarray(a[("head", "fc", "kernel")]),
                              np.asarray(params["head"]["fc"]["kernel"][...]))


def test_layer_decay_state_is_the_size_of_one_optimizer(vit_params):
    """Layer decay adds no state: the optimizer state has the structure of plain AdamW's (one
    group per scale would repeat the masked parameter tree in every group: what jit flattens
    on the host at every step)."""
    params = _fill(vit_params, 1.0)

    def nodes(tx):
        return jax.tree.structure(jax.eval_shape(tx.init, params)).num_nodes

    plain = nodes(optim.make_optimizer(_config(), params, total_steps=TOTAL))
    decayed = nodes(optim.make_optimizer(_config(layer_decay=0.5), params, total_steps=TOTAL))
    grouped = nodes(_one_group_per_scale(_config(layer_decay=0.5, grad_clip=1.0), params, 0.5))
    assert decayed == plain
    assert grouped > 3 * decayed


def test_no_layer_decay_gives_every_parameter_the_full_rate(resnet_params):
    params = _fill(resnet_params, 1.0)
    (update,) = _updates(optim.make_optimizer(_sgd(), params, total_steps=TOTAL),
                         _fill(resnet_params, 1.0), params)
    assert {float(v) for u in update.values() for v in np.unique(u)} == {-0.1 * np.float32(1)}


# ----------------------------------------------------------------------------------------------
# Weight decay


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_weight_decay_touches_kernels_only(vit_params, optimizer):
    config = _config(optimizer=optimizer, weight_decay=0.1, momentum=0.0)
    params = _fill(vit_params, 1.0)
    # zero gradient: Adam's step is 0 / (0 + eps) = 0, so only weight decay moves parameters
    (update,) = _updates(optim.make_optimizer(config, params, total_steps=TOTAL),
                         _fill(vit_params, 0.0), params)
    decayed = {p for p, u in update.items() if np.any(u != 0)}
    kernels = {p for p, u in update.items() if p[-1] == "kernel"}
    assert decayed == kernels
    for path in kernels:
        np.testing.assert_allclose(update[path], -0.1 * 0.1, rtol=1e-6)
    for path in [("encoder", "cls_token"), ("encoder", "norm", "scale"),
                 ("encoder", "blocks", 0, "norm1", "bias"), ("head", "fc", "bias")]:
        np.testing.assert_array_equal(update[path], 0.0)


# ----------------------------------------------------------------------------------------------
# Freezing


def _moment_bytes(state) -> int:
    """Bytes of the optimizer state's arrays (the scalar step counters left out)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim > 0)


def _param_bytes(params, keep=lambda path: True) -> int:
    return sum(x.nbytes for path, x in _flat(params).items() if keep(path))


def test_freeze_encoder_trains_the_head_only_and_keeps_no_state_for_the_encoder(vit_params):
    params = _fill(vit_params, 1.0)
    for freeze, head_only in [("encoder", True), ("none", False)]:
        config = _config(freeze=freeze, weight_decay=0.1)
        groups = _flat(optim.param_groups(params, config))
        assert {p for p, g in groups.items() if g == "frozen"} == (
            {p for p in groups if p[0] == "encoder"} if head_only else set())
        # AdamW keeps two moments per trained parameter, nothing per frozen one
        tx = optim.make_optimizer(config, params, total_steps=TOTAL)
        trained = _param_bytes(params, lambda p, h=head_only: not h or p[0] == "head")
        assert _moment_bytes(jax.eval_shape(tx.init, params)) == 2 * trained
        # (updates with SGD + weight decay: a smaller program to compile than AdamW's)
        tx = optim.make_optimizer(_sgd(freeze=freeze, weight_decay=0.1), params,
                                  total_steps=TOTAL)
        (update,) = _updates(tx, _fill(vit_params, 1.0), params)
        for path, u in update.items():
            frozen = head_only and path[0] == "encoder"
            assert np.all(u == 0) if frozen else np.all(u != 0), (freeze, path)
    assert _param_bytes(params, lambda p: p[0] == "head") < _param_bytes(params) / 100


def test_freeze_last_k_vit(vit_params):
    params = _fill(vit_params, 1.0)
    config = _sgd(freeze="last_k", freeze_keep=1)
    (update,) = _updates(optim.make_optimizer(config, params, total_steps=TOTAL),
                         _fill(vit_params, 1.0), params)
    trained = {p[:2] if p[1] != "blocks" else p[:3] for p, u in update.items() if np.any(u)}
    frozen = {p[:2] if p[1] != "blocks" else p[:3] for p, u in update.items() if not np.any(u)}
    assert trained == {("encoder", "blocks", 1), ("encoder", "norm"), ("head", "fc")}
    assert frozen == {("encoder", "blocks", 0), ("encoder", "patch_embed"),
                      ("encoder", "cls_token")}
    # k = depth + 1 reaches the stem: everything trains
    groups = optim.param_groups(params, _config(freeze="last_k", freeze_keep=DEPTH + 1))
    assert set(jax.tree.leaves(groups)) == {"train"}


@pytest.mark.parametrize("layer_decay, grad_accum", [(1.0, 1), (0.5, 2)])
def test_freeze_steps_holds_the_encoder_then_fine_tunes(vit_params, layer_decay, grad_accum):
    """LP-FT: for the first ``freeze_steps`` updates the encoder's updates are zero and the
    head's are a linear probe's (``freeze='encoder'``) exactly; from then on every parameter
    moves, the encoder at the rate the schedule has reached. With ``grad_accum`` the hold
    counts optimizer updates, not batches."""
    params = _fill(vit_params, 1.0)
    rng = np.random.default_rng(0)
    hold, updates = 2, 4
    grads = [jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), vit_params)
             for _ in range(updates * grad_accum)]

    def run(**overrides):
        config = _config(layer_decay=layer_decay, grad_accum=grad_accum, **overrides)
        tx = optim.make_optimizer(config, params, total_steps=TOTAL + 2)
        state, update, out = jax.jit(tx.init)(params), jax.jit(tx.update), []
        for g in grads:
            u, state = update(g, state, params)
            out.append(_flat(u))
        return out[grad_accum - 1::grad_accum]        # the calls that update

    lp_ft, probe = run(freeze_steps=hold), run(freeze="encoder")
    for k, (u, p) in enumerate(zip(lp_ft, probe, strict=True)):
        for path, x in u.items():
            if path[0] == "encoder":
                assert np.all(x == 0) if k < hold else np.any(x != 0), (k, path)
            elif k < hold:
                np.testing.assert_array_equal(x, p[path], err_msg=str((k, path)))
    # the held encoder's moments were kept: its first real update is AdamW's at step `hold`
    # with every earlier gradient averaged in, not a fresh start (~ +-lr, the sign of g)
    plain = run()
    for path, x in lp_ft[hold].items():
        if path[0] == "encoder":
            np.testing.assert_allclose(x, plain[hold][path], rtol=1e-5, atol=1e-8)


def test_freeze_steps_refusals(vit_params):
    from her2jax.models import roi_pool

    for overrides, match in [(dict(freeze_steps=-1), "non-negative"),
                             (dict(freeze_steps=1.5), "non-negative"),
                             (dict(freeze_steps=True), "non-negative"),
                             (dict(freeze_steps=TOTAL), "leaves no update"),
                             (dict(freeze_steps=1, freeze="encoder"), "freeze='none'")]:
        with pytest.raises(Her2jaxError, match=match) as error:
            optim.make_optimizer(_config(**overrides), vit_params, total_steps=TOTAL)
        assert error.value.key == "train.freeze_steps"
    roi_only = _abstract_params(lambda: heads.Classifier(
        None, heads.Head(34, 3, rngs=nnx.Rngs(0)),
        roi=roi_pool.RoiPool(in_channels=3, mask_channel=2, hidden=8, rim_voxels=(2, 4),
                             rngs=nnx.Rngs(0))))
    with pytest.raises(Her2jaxError, match="no encoder"):
        optim.make_optimizer(_config(freeze_steps=1), roi_only, total_steps=TOTAL)
    # a config written before the field existed reads as 0 (off)
    config = _config().to_dict()
    assert "freeze_steps" not in config
    optim.make_optimizer(ml_collections.ConfigDict(config), vit_params, total_steps=TOTAL)


def test_freeze_last_k_resnet(resnet_params):
    groups = _flat(optim.param_groups(resnet_params, _config(freeze="last_k", freeze_keep=1)))
    trained = {p[:2] for p, g in groups.items() if g == "train"}
    assert trained == {("encoder", "layer4"), ("head", "fc")}
    groups = _flat(optim.param_groups(resnet_params, _config(freeze="encoder")))
    assert {p[0] for p, g in groups.items() if g == "train"} == {"head"}


# ----------------------------------------------------------------------------------------------
# Gradient accumulation and clipping


def test_grad_accum_applies_the_mean_gradient_every_second_call(vit_params):
    params = _fill(vit_params, 1.0)
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), vit_params)
             for _ in range(4)]
    # SGD with momentum is linear in the gradient, so the comparison is tight (Adam's first
    # steps are ~sign(g) and magnify float noise where g is near 0).
    config = _config(optimizer="sgd", layer_decay=0.5, grad_clip=1.0)
    plain = optim.make_optimizer(config, params, total_steps=TOTAL)
    config.grad_accum = 2
    accum = optim.make_optimizer(config, params, total_steps=TOTAL)
    accum_state, plain_state = jax.jit(accum.init)(params), jax.jit(plain.init)(params)
    accum_update, plain_update = jax.jit(accum.update), jax.jit(plain.update)
    for i, g in enumerate(grads):
        u, accum_state = accum_update(g, accum_state, params)
        if i % 2 == 0:
            assert all(np.all(x == 0) for x in jax.tree.leaves(u)), i
            continue
        mean = jax.tree.map(lambda a, b: (a + b) / 2, grads[i - 1], g)
        expected, plain_state = plain_update(mean, plain_state, params)
        # the second real update uses lr(1) and the momentum of the first: the schedule and
        # the optimizer state count optimizer updates, not calls
        for got, want in zip(jax.tree.leaves(u), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
            assert np.any(got != 0)


def test_grad_clip_by_global_norm_over_trained_parameters(vit_params):
    params = _fill(vit_params, 1.0)
    # everything trains: the all-ones gradient (norm sqrt(n)) is scaled to norm 1
    (update,) = _updates(optim.make_optimizer(_sgd(grad_clip=1.0), params, total_steps=TOTAL),
                         _fill(vit_params, 1.0), params)
    norm = np.sqrt(sum(float(np.sum(np.square(u))) for u in update.values()))
    np.testing.assert_allclose(norm, 0.1, rtol=1e-5)
    n = sum(u.size for u in update.values())
    np.testing.assert_allclose(update[("head", "fc", "bias")], -0.1 / np.sqrt(n), rtol=1e-5)
    # a frozen encoder's huge gradient does not count: the head's small one is not clipped
    grads = jax.tree_util.tree_map_with_path(
        lambda p, s: np.full(s.shape, 1e3 if p[0].key == "encoder" else 0.01, s.dtype),
        vit_params)
    (update,) = _updates(
        optim.make_optimizer(_sgd(grad_clip=1.0, freeze="encoder"), params, total_steps=TOTAL),
        grads, params)
    np.testing.assert_allclose(update[("head", "fc", "kernel")], -0.1 * 0.01, rtol=1e-6)
    assert not np.any(update[("encoder", "norm", "scale")])


# ----------------------------------------------------------------------------------------------
# Config errors


@pytest.mark.parametrize("field, value", [
    ("optimizer", "adam"),
    ("freeze", "head"),
    ("layer_decay", 0.0),
    ("layer_decay", 1.5),
    ("warmup_steps", -1),
    ("warmup_steps", TOTAL),
    ("freeze_keep", -1),
    ("grad_accum", 0),
    ("grad_clip", -1.0),
    ("weight_decay", -0.1),
    ("learning_rate", -1e-3),
    ("b2", 1.0),
])
def test_bad_config_values_name_their_key(vit_params, field, value):
    config = _config(**{field: value, "freeze": "last_k" if field == "freeze_keep" else
                        value if field == "freeze" else "none"})
    with pytest.raises(Her2jaxError) as error:
        optim.make_optimizer(config, vit_params, total_steps=TOTAL)
    assert error.value.key == f"train.{field}"


def test_sgd_config_errors_and_missing_fields(vit_params):
    for overrides, key in [(dict(momentum=1.0), "train.momentum"),
                           (dict(momentum=0.0, nesterov=True), "train.nesterov")]:
        with pytest.raises(Her2jaxError) as error:
            optim.make_optimizer(_config(optimizer="sgd", **overrides), vit_params,
                                 total_steps=TOTAL)
        assert error.value.key == key
    config = _config().to_dict()
    del config["grad_clip"]
    with pytest.raises(Her2jaxError) as error:
        optim.make_optimizer(ml_collections.ConfigDict(config), vit_params, total_steps=TOTAL)
    assert error.value.key == "train.grad_clip"
    with pytest.raises(Her2jaxError, match="positive") as error:
        optim.learning_rate_schedule(_config(), 0)


@pytest.mark.parametrize("freeze", ["encoder", "last_k"])
def test_freezing_a_model_without_an_encoder_is_refused(freeze):
    """The tumour-region network alone (model.encoder='none'): freezing "the encoder" would
    freeze nothing and train everything, silently."""
    from her2jax.models import roi_pool

    params = _fill(_abstract_params(lambda: heads.Classifier(
        None, heads.Head(34, 3, rngs=nnx.Rngs(0)),
        roi=roi_pool.RoiPool(in_channels=3, mask_channel=2, hidden=8, rim_voxels=(2, 4),
                             rngs=nnx.Rngs(0)))), 1.0)
    with pytest.raises(Her2jaxError, match="the model has no encoder"):
        optim.param_groups(params, _config(freeze=freeze, freeze_keep=1))
    assert set(jax.tree.leaves(optim.param_groups(params, _config(freeze="none")))) == {"train"}
