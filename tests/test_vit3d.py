"""The FM-BCMRI 3D ViT on its own: shapes, state paths, position embedding, PyTorch numerics."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from her2jax.errors import Her2jaxError
from her2jax.models import activations, vit3d

TINY = vit3d.VIT_SIZES["tiny"]
TINY_CONFIG = dict(input_shape=(16, 16, 16), **TINY)


def _build(seed: int = 1, **overrides) -> vit3d.ViT3D:
    """A ViT3D with random (numpy) values in every parameter, LayerNorms and biases included.

    Built abstractly and filled on the host: eager random init compiles one small XLA program
    per parameter shape, which would dominate these tests' time on 2 CPU cores.
    """
    config = {**TINY_CONFIG, **overrides}
    abstract = nnx.eval_shape(lambda: vit3d.ViT3D(**config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        names = tuple(getattr(k, "key", None) for k in path)
        if names == ("pos_embed",):
            return jnp.asarray(vit3d.sincos_pos_embed_3d(abstract.grid, abstract.embed_dim)[None])
        noise = rng.standard_normal(leaf.shape, dtype=np.float32)
        if names[-1] == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray((1.0 if names[-1] == "scale" else 0.0) + 0.1 * noise)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _apply(model: vit3d.ViT3D, x, method: str = "__call__"):
    """model.method(x) through the functional pattern: split once, jit a pure function."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: getattr(nnx.merge(graphdef, s), method)(x))(state, x)


def _volumes(shape, batch=2, seed=0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, *shape)), jnp.float32)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------- shapes and dtypes

def test_real_init_eager_and_jit_agree_and_give_float32_features():
    model = vit3d.ViT3D(**TINY_CONFIG, rngs=nnx.Rngs(0))
    assert model.features_dim == 48
    np.testing.assert_array_equal(model.pos_embed[...][0],
                                  vit3d.sincos_pos_embed_3d((2, 2, 2), 48))
    x = _volumes((16, 16, 16, 1))
    eager = model(x)
    assert eager.shape == (2, 48) and eager.dtype == jnp.float32
    assert not np.allclose(eager[0], eager[1])      # the features depend on the volume
    # the training pattern: nnx.split once, a pure jitted function, nnx.merge inside
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def forward(params, rest, x):
        return nnx.merge(graphdef, params, rest, copy=True)(x)

    np.testing.assert_allclose(forward(params, rest, x), eager, rtol=1e-5, atol=1e-5)
    # float16 volumes (how the dataset stores them) go in; float32 features come out.
    half = forward(params, rest, x.astype(jnp.float16))
    assert half.dtype == jnp.float32 and _rel_err(half, eager) < 1e-2


def test_base_on_48_cubed_has_217_tokens():
    # Shapes only (abstract evaluation): real 217-token compute is in the padding test.
    model = nnx.eval_shape(lambda: vit3d.ViT3D(**vit3d.VIT_SIZES["base"], rngs=nnx.Rngs(0)))
    assert model.pos_embed.get_value().shape == (1, 217, 768)
    assert model.patch_embed.proj.kernel.get_value().shape == (8, 8, 8, 1, 768)
    assert len(model.blocks) == 12 and model.features_dim == 768
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 48, 48, 48, 1), jnp.bfloat16)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    tokens = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).tokens(x), state, x)
    assert (out.shape, out.dtype) == ((2, 768), jnp.float32)
    assert (tokens.shape, tokens.dtype) == ((2, 217, 768), jnp.float32)


def test_input_of_the_wrong_shape_is_refused():
    model = _build()
    with pytest.raises(Her2jaxError, match=r"expects \[B, 16, 16, 16, 1\]"):
        model(_volumes((16, 16, 16, 2)))
    with pytest.raises(Her2jaxError, match="input shape"):
        vit3d.ViT3D(input_shape=(16, 16, 20), **TINY, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- position embedding

def _pos_embed_loop(grid, embed_dim):
    """Straightforward per-token construction, written independently of the module."""
    pos_dim = embed_dim // 6
    omega = [1.0 / 10000.0 ** (k / pos_dim) for k in range(pos_dim)]
    rows = [[0.0] * embed_dim]
    for h, w, d in itertools.product(*(range(g) for g in grid)):   # last axis fastest
        row = []
        for coord in (h, w, d):
            row += [np.sin(coord * o) for o in omega]
            row += [np.cos(coord * o) for o in omega]
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("grid, embed_dim", [((2, 3, 4), 24), ((6, 6, 6), 768)])
def test_sincos_pos_embed_matches_a_per_token_loop(grid, embed_dim):
    table = vit3d.sincos_pos_embed_3d(grid, embed_dim)
    assert table.dtype == np.float32
    assert table.shape == (1 + int(np.prod(grid)), embed_dim)
    np.testing.assert_allclose(table, _pos_embed_loop(grid, embed_dim), atol=2e-6, rtol=0)


def test_sincos_pos_embed_spot_values():
    grid, e = (2, 3, 4), 24
    pd = e // 6
    table = vit3d.sincos_pos_embed_3d(grid, e)
    zeros, ones = np.zeros(pd), np.ones(pd)
    np.testing.assert_array_equal(table[0], np.zeros(e))                     # CLS
    np.testing.assert_array_equal(table[1], np.concatenate([zeros, ones] * 3))  # token (0,0,0)
    omega = 1.0 / 10000.0 ** (np.arange(pd) / pd)
    # token (0, 0, 1) is row 2: the last grid axis varies fastest (row-major, like the conv)
    np.testing.assert_allclose(table[2], np.concatenate(
        [zeros, ones, zeros, ones, np.sin(omega), np.cos(omega)]), atol=1e-7)
    # token (1, 0, 0) is row 1 + 3 * 4
    np.testing.assert_allclose(table[1 + 12], np.concatenate(
        [np.sin(omega), np.cos(omega), zeros, ones, zeros, ones]), atol=1e-7)


def test_embed_dim_not_divisible_by_6_is_refused():
    with pytest.raises(Her2jaxError, match="multiple of 6"):
        vit3d.sincos_pos_embed_3d((2, 2, 2), 50)
    with pytest.raises(Her2jaxError, match="multiple of 6"):
        vit3d.ViT3D(input_shape=(16, 16, 16), embed_dim=50, depth=1, num_heads=2,
                    rngs=nnx.Rngs(0))


def test_bad_attention_settings_are_refused():
    with pytest.raises(Her2jaxError, match="unknown attention"):
        vit3d.ViT3D(**TINY_CONFIG, attention="flash", rngs=nnx.Rngs(0))
    with pytest.raises(Her2jaxError, match="bfloat16 or float16"):   # float32 compute
        vit3d.ViT3D(**TINY_CONFIG, attention="cudnn", rngs=nnx.Rngs(0))
    with pytest.raises(Her2jaxError, match="num_heads"):
        vit3d.ViT3D(**{**TINY_CONFIG, "num_heads": 5}, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- state: the port's contract

def test_state_paths_mirror_the_pytorch_keys():
    model = nnx.eval_shape(lambda: vit3d.ViT3D(**TINY_CONFIG, rngs=nnx.Rngs(0)))
    e = TINY["embed_dim"]
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    expected = {("cls_token",), ("patch_embed", "proj", "kernel"), ("patch_embed", "proj", "bias"),
                ("norm", "scale"), ("norm", "bias")}
    for i in range(TINY["depth"]):
        for layer in ("norm1", "norm2"):
            expected |= {("blocks", i, layer, "scale"), ("blocks", i, layer, "bias")}
        for layer in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")):
            expected |= {("blocks", i, *layer, "kernel"), ("blocks", i, *layer, "bias")}
    assert set(params) == expected
    assert params[("blocks", 0, "attn", "qkv", "kernel")].get_value().shape == (e, 3 * e)
    assert params[("blocks", 1, "mlp", "fc1", "kernel")].get_value().shape == (e, 4 * e)
    assert params[("cls_token",)].get_value().shape == (1, 1, e)
    # pos_embed is state (ports and checkpoints carry it) but not a parameter
    everything = dict(nnx.to_flat_state(nnx.state(model)))
    assert set(everything) == expected | {("pos_embed",)}
    assert isinstance(everything[("pos_embed",)], vit3d.PosEmbed)
    assert not isinstance(everything[("pos_embed",)], nnx.Param)
    # the port walks PyTorch keys with getattr / indexing
    assert isinstance(model.blocks, nnx.List) and model.blocks[1].attn.qkv is not None
    assert not hasattr(model, "head")


def test_gradient_step_trains_params_but_not_pos_embed():
    model = _build()
    x = _volumes((16, 16, 16, 1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert ("pos_embed",) not in dict(nnx.to_flat_state(params))
    optimizer = optax.sgd(0.1)

    @jax.jit
    def step(params, rest):
        def loss(p):
            return jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x) ** 2)

        updates, _ = optimizer.update(jax.grad(loss)(params), optimizer.init(params))
        return optax.apply_updates(params, updates)

    trained = nnx.merge(graphdef, step(params, rest), rest)
    np.testing.assert_array_equal(trained.pos_embed[...], model.pos_embed[...])
    before = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    after = dict(nnx.to_flat_state(nnx.state(trained, nnx.Param)))
    moved = {path[0] for path in before if np.abs(after[path][...] - before[path][...]).max()}
    assert moved == {"cls_token", "patch_embed", "blocks", "norm"}


# ---------------------------------------------------------------- attention and precision

def test_gelu_is_jaxs_exact_gelu_and_differentiates_under_shard_map():
    # jax 0.12's erf derivative fails to trace under shard_map(check_vma=True), the train
    # step's setting; activations.gelu writes its derivative out.
    x = jnp.linspace(-8.0, 8.0, 64, dtype=jnp.float32)
    np.testing.assert_array_equal(activations.gelu(x), jax.nn.gelu(x, approximate=False))
    grad = jax.grad(lambda y: activations.gelu(y).sum())
    expected = jax.vmap(jax.grad(lambda y: y * jax.scipy.stats.norm.cdf(y)))(x)
    np.testing.assert_allclose(grad(x), expected, rtol=1e-6, atol=1e-6)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.jit(jax.shard_map(grad, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                                    check_vma=True))
    np.testing.assert_allclose(sharded(x), grad(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("input_shape, pad", [((16, 16, 16), 8),     # 9 -> 16 tokens
                                              ((48, 48, 48), 64)])   # 217 -> 256
def test_padded_attention_equals_unpadded(input_shape, pad):
    x = _volumes((*input_shape, 1), seed=3)
    plain = _build(input_shape=input_shape)
    padded = _build(input_shape=input_shape, attention_pad=pad)
    assert _rel_err(_apply(padded, x, "tokens"), _apply(plain, x, "tokens")) < 1e-5


def test_bfloat16_compute_is_close_to_float32_and_returns_float32():
    x = _volumes((16, 16, 16, 1))
    bf16 = _build(dtype=jnp.bfloat16)
    assert bf16.blocks[0].attn.qkv.kernel[...].dtype == jnp.float32   # float32 parameters
    ref, out = _apply(_build(), x), _apply(bf16, x)
    assert out.dtype == jnp.float32
    err = _rel_err(out, ref)
    assert 0 < err < 5e-2          # bfloat16 really computed, and close


def test_cls_shortcut_equals_the_cls_row_of_all_tokens():
    model = _build()
    x = _volumes((16, 16, 16, 1))
    np.testing.assert_allclose(_apply(model, x), _apply(model, x, "tokens")[:, 0],
                               rtol=1e-6, atol=1e-6)


def _tumour_pool_reference(tokens, mask, patch, shells, spread=False):
    """NumPy: patch tokens averaged with each patch's share of mask voxels, then of each shell's
    (the mask grown by 3x3x3 maximum filters to each outer edge, less the one inside it); with
    ``spread``, the tokens' weighted standard deviation inside the mask after its mean."""
    from scipy import ndimage

    out = []
    for t, m in zip(np.asarray(tokens, np.float64), np.clip(np.asarray(mask), 0, 1),
                    strict=True):
        weights, inner, grown = [m], m, m
        for k in range(1, shells[-1] + 1):
            grown = ndimage.maximum_filter(grown, size=3, mode="constant", cval=0.0)
            if k in shells:
                weights.append(np.clip(grown - inner, 0, 1))
                inner = grown
        row = []
        for w in weights:
            shares = [w[i:i + patch, j:j + patch, k:k + patch].mean()
                      for i, j, k in itertools.product(*(range(0, n, patch) for n in w.shape))]
            shares = np.asarray(shares)[:, None]       # row-major, as the tokens
            row.append((shares * t).sum(0) / (shares.sum() + 1e-6))
            if spread and len(row) == 1:
                variance = (shares * (t - row[0]) ** 2).sum(0) / (shares.sum() + 1e-6)
                row.append(np.sqrt(variance + 1e-6))
        out.append(np.concatenate(row))
    return np.stack(out)


@pytest.mark.parametrize("shells,spread", [((2,), False), ((1, 3), False), ((2,), True)])
def test_tumour_pool_averages_the_patch_tokens_inside_the_mask_and_on_shells(shells, spread):
    model = _build(in_channels=2, pool="tumour", mask_channel=1, spread=spread,
                   rim_voxels=shells[0] if len(shells) == 1 else shells)
    e = TINY["embed_dim"]
    assert model.features_dim == (1 + spread + len(shells)) * e
    x = np.array(_volumes((16, 16, 16, 2)))
    mask = np.zeros((2, 16, 16, 16), np.float32)
    mask[0, 3:9, 5:10, 6:8] = 1          # straddles patch borders (patch 8)
    mask[1, 9:14, 1:4, 10:15] = 1
    x[..., 1] = mask
    got = np.asarray(_apply(model, jnp.asarray(x)))
    tokens = _apply(model, jnp.asarray(x), "tokens")[:, 1:]
    np.testing.assert_allclose(got, _tumour_pool_reference(tokens, mask, 8, shells, spread),
                               rtol=1e-5, atol=1e-6)
    # The shells are not the tumour: each part of the features differs from the others.
    parts = np.split(got, 1 + spread + len(shells), axis=-1)
    for a, b in itertools.combinations(parts, 2):
        assert not np.allclose(a, b, atol=1e-3)


def test_tumour_pool_needs_a_mask_channel():
    with pytest.raises(Her2jaxError, match="pool 'tumour' needs the mask"):
        vit3d.ViT3D(**TINY_CONFIG, pool="tumour", rngs=nnx.Rngs(0))
    with pytest.raises(Her2jaxError, match="unknown pool 'mean'"):
        vit3d.ViT3D(**TINY_CONFIG, pool="mean", rngs=nnx.Rngs(0))
    with pytest.raises(Her2jaxError, match="rim_voxels"):
        vit3d.ViT3D(**TINY_CONFIG, in_channels=2, pool="tumour", mask_channel=1,
                    rim_voxels=(3, 2), rngs=nnx.Rngs(0))
    with pytest.raises(Her2jaxError, match="spread is a part of the tumour readout"):
        vit3d.ViT3D(**TINY_CONFIG, spread=True, rngs=nnx.Rngs(0))


def test_tumour_spread_is_zero_for_a_uniform_tumour_and_grows_with_its_variation():
    """A mask inside one patch has one token: no spread (the epsilon's root). Over two
    patches, the spread is half the two tokens' difference, per feature."""
    model = _build(in_channels=2, pool="tumour", mask_channel=1, spread=True)
    e = TINY["embed_dim"]
    x = np.array(_volumes((16, 16, 16, 2)))[:1]
    x[..., 1] = 0
    x[0, 1:5, 1:5, 1:5, 1] = 1                       # inside patch (0, 0, 0)
    spread = np.asarray(_apply(model, jnp.asarray(x)))[0, e:2 * e]
    np.testing.assert_allclose(spread, np.sqrt(1e-6), rtol=1e-3)
    x[0, 9:13, 1:5, 1:5, 1] = 1                      # and as many voxels in patch (1, 0, 0)
    tokens = np.asarray(_apply(model, jnp.asarray(x), "tokens"))[0, 1:]
    a, b = tokens[0], tokens[4]      # patches (0, 0, 0) and (1, 0, 0), row-major over 2 x 2 x 2
    spread = np.asarray(_apply(model, jnp.asarray(x)))[0, e:2 * e]
    np.testing.assert_allclose(spread, np.sqrt((a - b) ** 2 / 4 + 1e-6), rtol=1e-4,
                               atol=1e-5)


# ---------------------------------------------------------------- PyTorch reference

def _torch_reference(model: vit3d.ViT3D, num_heads: int):
    """A PyTorch ViT from built-ins with the Flax parameters copied in by hand."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def t(a, transpose=False):
        a = np.array(a, np.float32)                    # a writable copy
        return torch.from_numpy(np.ascontiguousarray(a.T if transpose else a))

    e = model.embed_dim
    p = model.patch_size
    conv = nn.Conv3d(model.in_channels, e, p, stride=p)
    layers = [nn.TransformerEncoderLayer(d_model=e, nhead=num_heads, dim_feedforward=4 * e,
                                         dropout=0.0, activation="gelu", layer_norm_eps=1e-6,
                                         batch_first=True, norm_first=True)
              for _ in model.blocks]
    norm = nn.LayerNorm(e, eps=1e-6)
    with torch.no_grad():
        # Flax (p, p, p, C, E) -> PyTorch (E, C, p, p, p)
        conv.weight.copy_(t(np.transpose(model.patch_embed.proj.kernel[...], (4, 3, 0, 1, 2))))
        conv.bias.copy_(t(model.patch_embed.proj.bias[...]))
        for layer, block in zip(layers, model.blocks, strict=True):
            layer.self_attn.in_proj_weight.copy_(t(block.attn.qkv.kernel[...], True))
            layer.self_attn.in_proj_bias.copy_(t(block.attn.qkv.bias[...]))
            layer.self_attn.out_proj.weight.copy_(t(block.attn.proj.kernel[...], True))
            layer.self_attn.out_proj.bias.copy_(t(block.attn.proj.bias[...]))
            layer.linear1.weight.copy_(t(block.mlp.fc1.kernel[...], True))
            layer.linear1.bias.copy_(t(block.mlp.fc1.bias[...]))
            layer.linear2.weight.copy_(t(block.mlp.fc2.kernel[...], True))
            layer.linear2.bias.copy_(t(block.mlp.fc2.bias[...]))
            for ours, theirs in ((block.norm1, layer.norm1), (block.norm2, layer.norm2)):
                theirs.weight.copy_(t(ours.scale[...]))
                theirs.bias.copy_(t(ours.bias[...]))
            layer.eval()
        norm.weight.copy_(t(model.norm.scale[...]))
        norm.bias.copy_(t(model.norm.bias[...]))
    cls_token = t(model.cls_token[...])
    pos_embed = t(model.pos_embed[...])

    def forward(x_ncxyz: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = conv(torch.from_numpy(x_ncxyz)).flatten(2).transpose(1, 2)   # timm PatchEmbed
            cls = (cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x + pos_embed[:, 1:]], dim=1)
            for layer in layers:
                x = layer(x)
            return norm(x).numpy()

    return forward


@pytest.mark.parametrize("config", [
    dict(input_shape=(16, 24, 32), in_channels=2, **TINY),                 # anisotropic grid
    dict(input_shape=(16, 16, 16), in_channels=1, embed_dim=96, depth=2, num_heads=4),
])
def test_matches_a_pytorch_reference(config):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = _build(**config)
    reference = _torch_reference(model, config["num_heads"])
    x = np.random.default_rng(5).normal(size=(2, *config["input_shape"], config["in_channels"]))
    x = x.astype(np.float32)
    ref_tokens = reference(np.ascontiguousarray(np.moveaxis(x, -1, 1)))   # (N, C, X, Y, Z)
    tokens = np.asarray(_apply(model, jnp.asarray(x), "tokens"))
    features = np.asarray(_apply(model, jnp.asarray(x)))
    assert np.abs(features - ref_tokens[:, 0]).max() <= 1e-4 * np.abs(ref_tokens[:, 0]).max()
    assert np.abs(tokens - ref_tokens).max() <= 1e-4 * np.abs(ref_tokens).max()
