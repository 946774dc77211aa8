"""The model a config describes, and `config.model.pretrained` loading a her2jax-port."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from her2jax.errors import Her2jaxError
from her2jax.models import factory, port

REPO = Path(__file__).resolve().parents[1]


def torch_references():
    """test_port's PyTorch references; skips the calling test where torch / monai (the `parity`
    extra) are not installed."""
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    from . import test_port

    return test_port


def load_config(name: str):
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.py")))
def test_every_config_describes_a_model_that_fits_its_data(name):
    config = load_config(name)
    if config.model.vit.attention == "cudnn" and jax.default_backend() == "cpu":
        config.model.vit.attention = "xla"   # cuDNN's kernel needs a GPU; padding stays on
    model = nnx.eval_shape(lambda: factory.build_model(config))
    shape = (2, *config.data.recipe.shape, len(config.data.recipe.channels))
    logits = nnx.eval_shape(lambda m: m(jnp.zeros(shape)), model)
    classes = 2 if config.data.scheme == "her2_binary" else 3
    assert logits.shape == (2, classes) and logits.dtype == jnp.float32


def test_pretrained_vit_is_loaded_from_the_config(tmp_path):
    ref = torch_references()
    torch = ref.torch
    torch.manual_seed(0)
    reference = ref.TorchViT3D(**ref.VIT_CONFIGS["tiny"]).eval()
    port.port("fmbcmri", ref.save_fmbcmri(reference, tmp_path / "ckpt.pth"), tmp_path / "port",
              num_heads=2)
    config = load_config("tiny_cpu")
    config.data.recipe.shape = (16, 16, 16)
    config.model.pretrained = str(tmp_path / "port")
    model = factory.build_model(config)
    model.eval()
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 16, 1)).astype(np.float32)
    with torch.no_grad():
        expected = reference(ref.to_torch(x)).numpy()
    ref.assert_parity(model.features(jnp.asarray(x)), expected)
    assert model(jnp.asarray(x)).shape == (2, 3)

    config.model.vit.size = "small"   # a port of another size does not fit
    with pytest.raises(Her2jaxError, match="does not fit this encoder"):
        factory.build_model(config)


def test_pretrained_resnet_inflated_to_the_recipe_channels(tmp_path):
    ref = torch_references()
    torch = ref.torch
    single = ref.monai_resnet(10)
    port.port("monai-resnet", ref.save_medicalnet(single, tmp_path / "r10.pth"),
              tmp_path / "port", in_channels=3, conv1_t_stride=2)
    config = load_config("resnet18")
    config.data.recipe.shape = (24, 24, 24)
    config.model.resnet.depth = 10
    config.model.resnet.shortcut = "B"
    config.model.resnet.bias_downsample = False
    config.model.resnet.dilated = False   # MONAI's network, as the reference
    config.model.pretrained = str(tmp_path / "port")
    model = factory.build_model(config)
    model.eval()
    x = np.random.default_rng(1).standard_normal((1, 24, 24, 24, 1)).astype(np.float32)
    with torch.no_grad():
        expected = single(ref.to_torch(x)).numpy()
    # Three identical channels through the inflated kernel = one channel through the original.
    ref.assert_parity(model.features(jnp.asarray(np.repeat(x, 3, axis=-1))), expected)


@pytest.mark.parametrize("field, value, key", [
    ("encoder", "swin3d", "model.encoder"), ("dtype", "float8", "model.dtype")])
def test_bad_model_config_is_a_user_error(field, value, key):
    config = load_config("tiny_cpu")
    setattr(config.model, field, value)
    with pytest.raises(Her2jaxError, match=key.replace(".", r"\.")):
        factory.build_model(config)


def test_tumour_pooled_vit_reads_the_recipes_mask_channel():
    config = load_config("tiny_cpu")
    config.model.vit.pool = "tumour"
    with pytest.raises(Her2jaxError, match=r"model\.vit\.pool.*MASK channel"):
        factory.build_model(config)     # tiny_cpu's recipe has one phase and no MASK
    config.data.recipe.channels = ("PE", "MASK")
    model = nnx.eval_shape(lambda: factory.build_model(config))
    assert model.encoder.mask_channel == 1
    assert model.encoder.features_dim == 2 * model.encoder.embed_dim
    shape = (2, *config.data.recipe.shape, 2)
    assert nnx.eval_shape(lambda m: m(jnp.zeros(shape)), model).shape == (2, 3)
    config.model.vit.rim_voxels = (2, 4)     # two shells, set as a command line would
    model = nnx.eval_shape(lambda: factory.build_model(config))
    assert model.encoder.features_dim == 3 * model.encoder.embed_dim
    config.model.vit.spread = True            # and the tokens' spread inside the tumour
    model = nnx.eval_shape(lambda: factory.build_model(config))
    assert model.encoder.features_dim == 4 * model.encoder.embed_dim
    assert nnx.eval_shape(lambda m: m(jnp.zeros(shape)), model).shape == (2, 3)
