"""The MedicalNet / MONAI 3D ResNet in Flax NNX against MONAI's PyTorch implementation.

The state dict is copied with a small local mapping (the real port lives in models/port.py);
what is tested here is the module: shapes, padding, shortcuts, BatchNorm and precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from her2jax.errors import Her2jaxError
from her2jax.models.resnet3d import RESNET_LAYERS, ResNet3D, medicalnet_args

# Odd and even sizes along each axis exercise the padding of every strided conv and pool:
# with MedicalNet's stem, (32, 40, 48) becomes (8, 10, 12) after the max pool, then
# (4, 5, 6), (2, 3, 3), (1, 2, 2). SMALL keeps CPU time down where the size matters less.
SPATIAL = (32, 40, 48)
SMALL = (16, 20, 24)
# A narrow MedicalNet-style ResNet-10 for tests of mechanics rather than parity.
NARROW = {"depth": 10, **medicalnet_args(10), "conv1_t_stride": 2, "block_inplanes": (16, 16, 32, 64)}


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("monai")
    torch.set_num_threads(2)
    return torch


def monai_resnet(torch, depth, *, seed=0, **kwargs):
    """A MONAI ResNet with random weights and non-trivial BatchNorm state, in eval mode."""
    from monai.networks.nets import resnet

    torch.manual_seed(seed)
    kwargs = {"spatial_dims": 3, "n_input_channels": 1, "feed_forward": False, **kwargs}
    net = getattr(resnet, f"resnet{depth}")(**kwargs)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, torch.nn.Conv3d) and m.bias is not None:
                m.bias.normal_(0.0, 0.2)
    return net.eval()


def load_state_dict(model: nnx.Module, state_dict) -> None:
    """Copies a PyTorch ResNet state dict into ``model`` by attribute name; checks completeness."""
    n_leaves = len(nnx.to_flat_state(nnx.state(model)))
    copied = 0
    for key, tensor in state_dict.items():
        *path, name = key.split(".")
        if name == "num_batches_tracked":
            continue
        value = tensor.detach().cpu().numpy()
        node = model
        for part in path:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        if name == "weight":
            name = "kernel" if value.ndim == 5 else "scale"
            if value.ndim == 5:  # (O, I, kD, kH, kW) -> (kD, kH, kW, I, O)
                value = value.transpose(2, 3, 4, 1, 0)
        name = {"running_mean": "mean", "running_var": "var"}.get(name, name)
        variable = getattr(node, name)
        assert variable.get_value().shape == value.shape, key  # the model may be abstract
        variable.set_value(jnp.asarray(value))
        copied += 1
    assert copied == n_leaves  # every NNX variable has a PyTorch counterpart


def random_model(seed=0, **kwargs) -> ResNet3D:
    """A ResNet3D with random weights and BatchNorm state, without the slow eager init."""
    model = nnx.eval_shape(lambda: ResNet3D(rngs=nnx.Rngs(0), **kwargs))
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        shape = variable.get_value().shape
        if path[-1] == "kernel":  # kaiming fan_out, as MONAI
            value = rng.normal(0, np.sqrt(2 / np.prod(shape[:3] + shape[-1:])), shape)
        elif path[-1] in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = rng.normal(0, 0.2, shape)
        variable.set_value(jnp.asarray(value, jnp.float32))
    return model


def to_flax(x):
    return jnp.asarray(np.moveaxis(x.numpy(), 1, -1))


def rel_err(a, ref):
    a, ref = np.asarray(a), np.asarray(ref)
    return np.max(np.abs(a - ref)) / np.max(np.abs(ref))


@functools.cache
def _forward():
    return nnx.jit(lambda model, x: model(x))


def forward(model, x):
    return _forward()(model, x)


def paired(torch, depth, *, seed=0, **kwargs):
    """(MONAI net, Flax model with the same weights), both in eval mode.

    ``kwargs`` use the Flax names; the MONAI ones are derived.
    """
    kwargs = {"conv1_t_stride": 2, **medicalnet_args(depth), **kwargs}
    torch_kwargs = {("shortcut_type" if k == "shortcut" else
                     "n_input_channels" if k == "in_channels" else k): v for k, v in kwargs.items()}
    net = monai_resnet(torch, depth, seed=seed, **torch_kwargs)
    # every variable is overwritten: skip the (slow, eager) random initialisation
    model = nnx.eval_shape(lambda: ResNet3D(depth=depth, rngs=nnx.Rngs(seed), **kwargs))
    load_state_dict(model, net.state_dict())
    model.eval()
    return net, model


@pytest.mark.parametrize(
    "depth, kwargs, spatial",
    [
        (10, {}, SPATIAL),  # MedicalNet: shortcut B without bias
        (18, {}, SPATIAL),  # MedicalNet: shortcut A
        (50, {}, SMALL),  # bottleneck; projection already in layer1 (64 -> 256 at stride 1)
        (18, {"shortcut": "B", "bias_downsample": True}, SMALL),
        (10, {"conv1_t_stride": 1}, SMALL),  # MONAI: stride 1 on all three axes
        # kenshohara's anisotropic stem (MONAI takes triples), no max pool
        (10, {"conv1_t_size": (3, 7, 5), "conv1_t_stride": (1, 2, 2), "no_max_pool": True},
         SMALL),
        (10, {"widen_factor": 0.5, "in_channels": 3}, SMALL),
    ],
    ids=["r10", "r18", "r50", "r18-B-bias", "r10-t1", "r10-stem-nomaxpool", "r10-widen.5-c3"],
)
def test_eval_features_match_monai(torch, depth, kwargs, spatial):
    net, model = paired(torch, depth, **kwargs)
    x = torch.randn(2, kwargs.get("in_channels", 1), *spatial,
                    generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x).numpy()
    out = forward(model, to_flax(x))
    assert out.shape == ref.shape == (2, model.features_dim)
    assert out.dtype == jnp.float32
    assert np.std(ref) > 0.01 * np.max(np.abs(ref))  # features are not degenerate
    assert rel_err(out, ref) <= 1e-4


def test_medicalnet_args_and_layers_match_monai(torch):
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args, resnet_params

    for depth, (block, layers) in RESNET_LAYERS.items():
        bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
        assert medicalnet_args(depth) == {"shortcut": shortcut, "bias_downsample": bias_downsample}
        assert resnet_params[f"resnet{depth}"][:2] == (block, list(layers))
    assert len(RESNET_LAYERS) == len(resnet_params)


def test_resnet34_shapes_match_monai(torch):
    net = monai_resnet(torch, 34, conv1_t_stride=2, shortcut_type="A", bias_downsample=True)
    abstract = nnx.eval_shape(lambda: ResNet3D(depth=34, **medicalnet_args(34), rngs=nnx.Rngs(0)))
    flat = {path: v.get_value().shape for path, v in nnx.to_flat_state(nnx.state(abstract))}
    expected = {}
    for key, tensor in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        *path, name = key.split(".")
        shape = tuple(tensor.shape)
        if name == "weight":
            name = "kernel" if len(shape) == 5 else "scale"
            shape = shape[2:] + shape[1::-1] if len(shape) == 5 else shape
        name = {"running_mean": "mean", "running_var": "var"}.get(name, name)
        expected[tuple(int(p) if p.isdigit() else p for p in path) + (name,)] = shape
    assert flat == expected
    assert abstract.features_dim == 512


def test_state_paths_and_variable_types():
    r10 = nnx.eval_shape(lambda: ResNet3D(depth=10, **medicalnet_args(10), rngs=nnx.Rngs(0)))
    state = dict(nnx.to_flat_state(nnx.state(r10)))
    assert state[("conv1", "kernel")].get_value().shape == (7, 7, 7, 1, 64)
    assert state[("layer2", 0, "downsample", 0, "kernel")].get_value().shape == (1, 1, 1, 64, 128)
    assert ("layer2", 0, "downsample", 0, "bias") not in state  # MedicalNet: no bias
    assert ("layer1", 0, "downsample", 0, "kernel") not in state  # same shape: identity
    for path, variable in state.items():
        kind = nnx.BatchStat if path[-1] in ("mean", "var") else nnx.Param
        assert type(variable) is kind, path
    assert r10.features_dim == 512

    r50 = nnx.eval_shape(lambda: ResNet3D(depth=50, rngs=nnx.Rngs(0)))
    state = dict(nnx.to_flat_state(nnx.state(r50)))
    assert state[("layer1", 0, "downsample", 0, "kernel")].get_value().shape == (1, 1, 1, 64, 256)
    assert state[("layer1", 0, "downsample", 0, "bias")].get_value().shape == (256,)
    assert state[("layer3", 5, "conv3", "kernel")].get_value().shape == (1, 1, 1, 256, 1024)
    assert state[("layer4", 0, "conv2", "kernel")].get_value().shape == (3, 3, 3, 512, 512)
    assert r50.features_dim == 2048

    r18a = nnx.eval_shape(lambda: ResNet3D(depth=18, shortcut="A", rngs=nnx.Rngs(0)))
    assert not any("downsample" in path for path, _ in nnx.to_flat_state(nnx.state(r18a)))

    wide = nnx.eval_shape(lambda: ResNet3D(depth=50, widen_factor=2.0, rngs=nnx.Rngs(0)))
    assert wide.features_dim == 4096  # FMCIB's encoder
    assert nnx.state(wide)["layer1"][0]["conv2"]["kernel"].get_value().shape == (3, 3, 3, 128, 128)


def test_train_mode_matches_monai_up_to_bessel_correction(torch):
    """One training-mode forward: same features and running means; running variances differ
    exactly by PyTorch's unbiased n / (n - 1) factor on the batch term."""
    net, model = paired(torch, 10)
    old = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
    counts = {}  # BatchNorm name -> values per channel in its batch (n)

    def record(name):
        return lambda module, inputs, output: counts.__setitem__(
            name, inputs[0].numel() // inputs[0].shape[1])

    for name, module in net.named_modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.register_forward_hook(record(name))
    x = torch.randn(2, 1, *SPATIAL, generator=torch.Generator().manual_seed(2))
    net.train()
    with torch.no_grad():
        ref = net(x).numpy()
    model.train()
    out = forward(model, to_flax(x))
    assert rel_err(out, ref) <= 1e-4

    new = dict(nnx.to_flat_state(nnx.state(model, nnx.BatchStat)))
    torch_state = net.state_dict()
    max_bessel_gap = 0.0
    for name, n in counts.items():
        path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
        mean_ref = torch_state[f"{name}.running_mean"].numpy()
        var_ref = torch_state[f"{name}.running_var"].numpy()
        mean, var = np.asarray(new[path + ("mean",)][...]), np.asarray(new[path + ("var",)][...])
        old_mean, old_var = old[path + ("mean",)], old[path + ("var",)]
        assert not np.allclose(mean, old_mean)  # the statistics did move
        # momentum 0.9 in Flax = 0.1 in PyTorch
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-4, atol=1e-5 * np.abs(mean_ref).max())
        biased_batch_var = (var - 0.9 * old_var) / 0.1
        np.testing.assert_allclose(0.9 * old_var + 0.1 * biased_batch_var * n / (n - 1), var_ref,
                                   rtol=1e-4)
        max_bessel_gap = max(max_bessel_gap, rel_err(var, var_ref))
    assert len(counts) == 1 + 2 * 4 + 3  # stem, two per basic block, three type-B shortcuts
    assert max_bessel_gap > 1e-3  # the convention difference is real on small late feature maps


def test_shortcut_a_cuts_the_gradient_like_monai(torch):
    """MONAI's shortcut A concatenates ``out.data``: the identity path carries no gradient."""
    net, model = paired(torch, 10, shortcut="A")
    x = torch.randn(1, 1, 16, 24, 24, generator=torch.Generator().manual_seed(3),
                    requires_grad=True)
    net(x).square().sum().backward()
    graphdef, state = nnx.split(model)

    @jax.jit
    def grad_input(state, x):
        return jax.grad(lambda x: jnp.sum(jnp.square(nnx.merge(graphdef, state)(x))))(x)

    grad = grad_input(state, to_flax(x.detach()))
    ref = np.moveaxis(x.grad.numpy(), 1, -1)
    assert np.max(np.abs(ref)) > 0
    assert rel_err(grad, ref) <= 1e-4


def test_random_init_follows_monai():
    """Kaiming-normal (fan_out) convolutions, unit BatchNorm, zero biases, training mode."""
    model = ResNet3D(depth=10, block_inplanes=(16, 16, 16, 16), rngs=nnx.Rngs(0))
    kernel = np.asarray(model.layer1[0].conv2.kernel[...])  # 3x3x3, 16 -> 16
    np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (27 * 16)), rtol=0.05)
    assert abs(kernel.mean()) < 0.1 * kernel.std()
    bn = model.layer2[0].downsample[1]
    assert np.all(bn.scale[...] == 1) and np.all(bn.bias[...] == 0)
    assert np.all(bn.mean[...] == 0) and np.all(bn.var[...] == 1)
    assert np.all(model.layer2[0].downsample[0].bias[...] == 0)
    assert (bn.momentum, bn.epsilon, bn.use_running_average) == (0.9, 1e-5, False)
    assert model.features_dim == 16


def test_functional_jit_equals_eager_in_train_and_eval():
    # without max pool layer4 is (1, 2, 2): its BatchNorm sees 8 values per channel, enough to
    # be well conditioned (with only 2, float rounding decides the sign of the output)
    model = random_model(**NARROW, no_max_pool=True)
    x = jax.random.normal(jax.random.key(0), (2, *SMALL, 1))
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

    @functools.partial(jax.jit, static_argnames="train")
    def apply(params, stats, rest, x, *, train):
        m = nnx.merge(graphdef, params, stats, rest, copy=True)
        m.train() if train else m.eval()
        return m(x), nnx.state(m, nnx.BatchStat)

    old_mean = np.array(stats["bn1"]["mean"][...])
    out_train, new_stats = apply(params, stats, rest, x, train=True)
    # the jitted call left its inputs alone (copy=True) and returned moved statistics
    np.testing.assert_array_equal(stats["bn1"]["mean"][...], old_mean)
    assert not np.allclose(new_stats["bn1"]["mean"][...], old_mean)

    eager_train = model(x)  # built in training mode: updates its own statistics
    assert rel_err(out_train, eager_train) <= 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 new_stats, nnx.state(model, nnx.BatchStat))

    model.eval()
    out_eval, same_stats = apply(params, new_stats, rest, x, train=False)
    assert rel_err(out_eval, model(x)) <= 1e-5
    assert rel_err(out_eval, out_train) > 1e-2  # eval really uses the running statistics
    np.testing.assert_array_equal(same_stats["bn1"]["var"][...], new_stats["bn1"]["var"][...])


def test_bfloat16_compute_is_close_and_returns_float32():
    f32 = random_model(**NARROW)
    bf16 = random_model(**NARROW, dtype=jnp.bfloat16)
    f32.eval()
    bf16.eval()
    x = jax.random.normal(jax.random.key(1), (2, *SMALL, 1))
    ref, out = forward(f32, x), forward(bf16, x)
    assert out.dtype == jnp.float32 and out.shape == (2, 64)
    assert all(v[...].dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(bf16)))
    err = rel_err(out, ref)
    assert 1e-4 < err <= 5e-2  # really computed in bfloat16, and close to float32
    assert np.corrcoef(np.ravel(out), np.ravel(ref))[0, 1] > 0.999


def test_batch_stats_are_synchronised_over_the_data_axis():
    """Under shard_map with bn_axis_name='data', statistics equal the whole-batch ones."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    if n < 2:
        pytest.skip("needs several (fake) devices")
    synced = random_model(**NARROW, bn_axis_name="data")
    single = random_model(**NARROW)
    mesh = jax.make_mesh((n,), ("data",))
    x = jax.random.normal(jax.random.key(2), (2 * n, *SMALL, 1)) + 0.5
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    graphdef, params, stats = nnx.split(synced, nnx.Param, nnx.BatchStat)

    def per_device(params, stats, x):
        m = nnx.merge(graphdef, params, stats, copy=True)
        return m(x), nnx.state(m, nnx.BatchStat)

    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P("data")),
                                 out_specs=(P("data"), P()), check_vma=True))
    out, new_stats = step(params, stats, x)
    ref = forward(single, np.asarray(x))
    assert rel_err(out, ref) <= 1e-4
    ref_stats = nnx.state(single, nnx.BatchStat)
    assert not np.allclose(ref_stats["bn1"]["mean"][...], stats["bn1"]["mean"][...])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 new_stats, ref_stats)


def test_rejects_unknown_depth_and_shortcut():
    with pytest.raises(Her2jaxError, match="depth 19"):
        ResNet3D(depth=19, rngs=nnx.Rngs(0))
    with pytest.raises(Her2jaxError, match="shortcut"):
        ResNet3D(depth=10, shortcut="C", rngs=nnx.Rngs(0))
    with pytest.raises(Her2jaxError):
        medicalnet_args(20)
