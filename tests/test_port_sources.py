"""The named port sources, each against a PyTorch reference written in its upstream layout.

Every checkpoint here is written by the tests' own torch code in the layout the upstream
project saves (key names, wrappers, heads, serialisation), with random weights:

* ``medicalnet``: Tencent's ``models/resnet.py`` network as trained (layers 3-4 at stride 1,
  dilated 2 / 4; a ``conv_seg`` decoder), the release files (``{"state_dict": {"module." +
  key}}``, PyTorch-0.4 legacy serialisation) and a fine-tuned / segmentation file (with
  ``conv_seg.*`` and the optimizer);
* ``breastmrfm``: BreastMR-FM's Lightning module (``encoder`` = MONAI resnet10 with MONAI's
  defaults, ``projection.proj``) saved as a Lightning ``.ckpt`` (state_dict, optimizer
  states, callbacks, loops, hyper-parameters);
* ``fmcib``: FMCIB's trunk (MONAI resnet50 layout, widen 2, stride-2 stem) as
  ``model_weights.torch`` (``trunk_state_dict`` + ``head_state_dict``) and as a Lighter
  ``.ckpt`` (``model.trunk.*``, ``model.heads.*``);
* ``fmbcmri`` ``vit_3d_small`` (12 heads of 32), which used to port with 6 heads;
* the generic ``monai-resnet`` / ``timm-vit3d``, which refuse to guess.

Parity: max |ours - reference| <= 1e-4 x max |reference| in float32, with and without
first-layer inflation (``--in_channels``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from her2jax.errors import Her2jaxError
from her2jax.models import factory, port

from .test_factory import load_config

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

from .test_port import (  # noqa: E402  (after the importorskip guards)
    REPO,
    VIT_CONFIGS,
    TorchViT3D,
    assert_parity,
    ported,
    save_fmbcmri,
    to_torch,
)

nn = torch.nn


def _randomise_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so a swapped name shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.4 * torch.rand(n, generator=generator) - 0.2)
    return model.eval()


def _features(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(to_torch(x)).numpy()


def _inflated(reference: nn.Module, make, channels: int) -> nn.Module:
    """The reference with its single-channel first kernel repeated over ``channels`` / C."""
    triple = make(channels)
    state = reference.state_dict()
    key = next(k for k in state if k.endswith("conv1.weight") and state[k].ndim == 5)
    state[key] = state[key].repeat(1, channels, 1, 1, 1) / channels
    triple.load_state_dict(state)
    return triple.eval()


# ---------------------------------------------------------------- MedicalNet as trained


def _tencent_conv3(in_planes, out_planes, stride=1, dilation=1):
    return nn.Conv3d(in_planes, out_planes, 3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


def _tencent_shortcut_a(x, planes, stride):
    out = nn.functional.avg_pool3d(x, kernel_size=1, stride=stride)
    zeros = torch.zeros(out.size(0), planes - out.size(1), *out.shape[2:])
    return torch.cat([out.data, zeros], dim=1)


class TencentBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = _tencent_conv3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _tencent_conv3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + residual)


class TencentBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _tencent_conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + residual)


TENCENT_LAYERS = {10: (TencentBasicBlock, [1, 1, 1, 1]), 18: (TencentBasicBlock, [2, 2, 2, 2]),
                  50: (TencentBottleneck, [3, 4, 6, 3])}


class TencentMedicalNet(nn.Module):
    """Tencent MedicalNet's ``models/resnet.py`` ResNet, rebuilt from its layout: a 7x7x7 / 2
    stem, max pool, layers 3 and 4 at stride 1 dilated 2 and 4, a segmentation decoder
    ``conv_seg``. ``forward`` returns what a port's encoder gives: layer 4, averaged."""

    def __init__(self, depth: int, shortcut: str, in_channels: int = 1):
        super().__init__()
        block, layers = TENCENT_LAYERS[depth]
        self.inplanes = 64
        self.shortcut = shortcut
        self.conv1 = nn.Conv3d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], dilation=2)
        self.layer4 = self._make_layer(block, 512, layers[3], dilation=4)
        self.conv_seg = nn.Sequential(
            nn.ConvTranspose3d(512 * block.expansion, 32, 2, stride=2), nn.BatchNorm3d(32),
            nn.ReLU(inplace=True), nn.Conv3d(32, 32, 3, padding=1, bias=False),
            nn.BatchNorm3d(32), nn.ReLU(inplace=True), nn.Conv3d(32, 2, 1, bias=False))

    def _make_layer(self, block, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            if self.shortcut == "A":
                downsample = partial(_tencent_shortcut_a, planes=planes * block.expansion,
                                     stride=stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self.inplanes, planes * block.expansion, 1, stride=stride,
                              bias=False),
                    nn.BatchNorm3d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3, 4))


def tencent_medicalnet(depth: int, in_channels: int = 1) -> TencentMedicalNet:
    torch.manual_seed(100 + depth)
    model = TencentMedicalNet(depth, "A" if depth in (18, 34) else "B", in_channels)
    return _randomise_batchnorm(model, depth)


def save_medicalnet_release(model: nn.Module, path: Path) -> Path:
    """A MedicalNet release file (``resnet_10.pth``): the encoder under ``state_dict`` with
    DataParallel's ``module.``, PyTorch 0.4's legacy serialisation."""
    state = {"module." + k: v for k, v in model.state_dict().items()
             if not k.startswith("conv_seg.")}
    torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=False)
    return path


def save_medicalnet_finetuned(model: nn.Module, path: Path) -> Path:
    """What MedicalNet's train.py saves: the whole network (decoder included) and the
    optimizer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    model.conv_seg(torch.zeros(1, model.conv_seg[0].in_channels, 2, 2, 2)).sum().backward()
    optimizer.step()
    model.eval()
    torch.save({"ecpoch": 3, "batch_id": 40,
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, path)
    return path


@pytest.mark.parametrize("depth", [10, 18, 50])
def test_medicalnet_ports_the_dilated_network_its_weights_were_trained_in(depth, tmp_path):
    reference = tencent_medicalnet(depth)
    checkpoint = save_medicalnet_release(reference, tmp_path / f"resnet_{depth}.pth")
    report = port.port("medicalnet", checkpoint, tmp_path / "port")
    assert report.architecture["dilated"] is True
    assert report.facts["dilated"]["from"] == "source medicalnet"
    assert report.architecture["shortcut"] == ("A" if depth in (18, 34) else "B")
    x = np.random.default_rng(depth).standard_normal((2, 32, 40, 48, 1)).astype(np.float32)
    expected = _features(reference, x)
    ours = np.asarray(ported(tmp_path / "port")(jnp.asarray(x)))
    assert_parity(ours, expected)
    # The same weights in MONAI's undilated network (what her2jax built until 2026-12-05)
    # give other features, 100 times the parity tolerance away at least.
    port.port("medicalnet", checkpoint, tmp_path / "undilated", dilated=False)
    undilated = np.asarray(ported(tmp_path / "undilated")(jnp.asarray(x)))
    assert np.abs(undilated - expected).max() > 0.01 * np.abs(expected).max()


def test_medicalnet_finetuned_file_drops_its_decoder_and_inflates(tmp_path):
    reference = tencent_medicalnet(10)
    checkpoint = save_medicalnet_finetuned(reference, tmp_path / "seg.pth.tar")
    report = port.port("medicalnet", checkpoint, tmp_path / "port", in_channels=3)
    assert {k.split(".")[1] for k in report.dropped if ".conv_seg." in k} == {"conv_seg"}
    # ConvTranspose (2), two BatchNorms (5 each), two convolutions (1 each).
    assert sum(".conv_seg." in k for k in report.dropped) == 14
    triple = _inflated(reference, lambda c: tencent_medicalnet(10, in_channels=c), 3)
    x = np.random.default_rng(5).standard_normal((1, 32, 32, 32, 3)).astype(np.float32)
    assert_parity(ported(tmp_path / "port")(jnp.asarray(x)), _features(triple, x))


# ---------------------------------------------------------------- BreastMR-FM (Lightning)


class BreastMRFMModule(nn.Module):
    """BreastMR-FM's SimCLRModule without Lightning: ``encoder`` = MONAI resnet10 with
    MONAI's defaults (stem stride 1), ``projection.proj`` = Linear-ReLU-Linear."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.encoder = monai_nets.resnet10(spatial_dims=3, n_input_channels=in_channels,
                                           feed_forward=False)
        self.projection = nn.Module()
        self.projection.proj = nn.Sequential(nn.Linear(512, 256), nn.ReLU(inplace=True),
                                             nn.Linear(256, 128))


def breastmrfm(in_channels: int = 1) -> BreastMRFMModule:
    torch.manual_seed(7)
    return _randomise_batchnorm(BreastMRFMModule(in_channels), 7)


def save_lightning_ckpt(module: nn.Module, path: Path) -> Path:
    """A PyTorch Lightning 2.x checkpoint as ``Trainer.save_checkpoint`` writes it."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module.train()
    module.projection.proj(module.encoder(torch.randn(2, 1, 16, 16, 16))).sum().backward()
    optimizer.step()
    module.eval()
    callback = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0}"
    torch.save({
        "epoch": 99, "global_step": 46200, "pytorch-lightning_version": "2.4.0",
        "state_dict": module.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {
            "total": {"ready": 100, "completed": 99}, "current": {"ready": 100}}}},
        "callbacks": {callback: {
            "monitor": "val_loss", "best_model_score": torch.tensor(3.21),
            "best_model_path": "/ckpt/epoch=99-step=46200.ckpt", "current_score": torch.tensor(3.3),
            "dirpath": "/ckpt", "best_k_models": {"/ckpt/epoch=99-step=46200.ckpt":
                                                  torch.tensor(3.21)},
            "kth_best_model_path": "", "kth_value": torch.tensor(float("inf")),
            "last_model_path": ""}},
        "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
        "MixedPrecision": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 2000, "_growth_tracker": 7},
        "hparams_name": "kwargs", "hyper_parameters": {"lr": 1e-4},
    }, path)
    return path


def test_breastmrfm_lightning_ckpt_ports_with_its_stride_1_stem(tmp_path):
    module = breastmrfm()
    checkpoint = save_lightning_ckpt(module, tmp_path / "epoch=99-step=46200.ckpt")
    report = port.port("breastmrfm", checkpoint, tmp_path / "port")
    assert report.architecture["depth"] == 10 and report.architecture["conv1_t_stride"] == 1
    assert report.facts["conv1_t_stride"] == {"value": 1, "from": "source breastmrfm"}
    assert sorted(report.dropped) == [k for k in sorted(report.dropped)
                                      if k.startswith("projection.") or "num_batches" in k]
    assert sum(k.startswith("projection.proj.") for k in report.dropped) == 4
    x = np.random.default_rng(7).standard_normal((2, 32, 32, 32, 1)).astype(np.float32)
    assert_parity(ported(tmp_path / "port")(jnp.asarray(x)), _features(module.encoder, x))

    port.port("breastmrfm", checkpoint, tmp_path / "port2", in_channels=2)
    double = _inflated(module.encoder, lambda c: breastmrfm(c).encoder, 2)
    x2 = np.random.default_rng(8).standard_normal((1, 32, 32, 32, 2)).astype(np.float32)
    assert_parity(ported(tmp_path / "port2")(jnp.asarray(x2)), _features(double, x2))


# ---------------------------------------------------------------- FMCIB


def fmcib_trunk(in_channels: int = 1) -> nn.Module:
    """FMCIB's trunk: monai resnet50(widen_factor=2, conv1_t_stride=2, feed_forward=False),
    its stage widths cut by 8 (same keys and layout; the real one has 4096 features)."""
    torch.manual_seed(11)
    model = monai_nets.ResNet(block="bottleneck", layers=[3, 4, 6, 3],
                              block_inplanes=[8, 16, 32, 64], spatial_dims=3,
                              n_input_channels=in_channels, conv1_t_stride=2, widen_factor=2,
                              feed_forward=False)
    return _randomise_batchnorm(model, 11)


def fmcib_heads() -> nn.Module:
    return nn.Sequential(nn.Sequential(nn.Linear(512, 256), nn.ReLU(inplace=True)),
                         nn.Sequential(nn.Linear(256, 1)))


def test_fmcib_model_weights_and_lighter_ckpt_port_alike(tmp_path):
    trunk, heads = fmcib_trunk(), fmcib_heads()
    weights = tmp_path / "model_weights.torch"
    torch.save({"trunk_state_dict": trunk.state_dict(), "head_state_dict": heads.state_dict()},
               weights)
    lighter = tmp_path / "fmcib.ckpt"
    state = {**{f"model.trunk.{k}": v for k, v in trunk.state_dict().items()},
             **{f"model.heads.{k}": v for k, v in heads.state_dict().items()}}
    torch.save({"epoch": 50, "global_step": 1000, "state_dict": state,
                "pytorch-lightning_version": "2.1.0", "optimizer_states": [],
                "lr_schedulers": []}, lighter)
    x = np.random.default_rng(11).standard_normal((2, 50, 50, 50, 1)).astype(np.float32)
    expected = _features(trunk, x)
    for name, checkpoint in (("weights", weights), ("lighter", lighter)):
        report = port.port("fmcib", checkpoint, tmp_path / name)
        assert report.architecture["depth"] == 50 and report.architecture["conv1_t_stride"] == 2
        assert report.architecture["bias_downsample"] is True   # MONAI's default
        assert_parity(ported(tmp_path / name)(jnp.asarray(x)), expected)
    assert sum(k.startswith("model.heads.") for k in report.dropped) == 4

    port.port("fmcib", weights, tmp_path / "inflated", in_channels=3)
    triple = _inflated(trunk, fmcib_trunk, 3)
    x3 = np.random.default_rng(12).standard_normal((1, 50, 50, 50, 3)).astype(np.float32)
    assert_parity(ported(tmp_path / "inflated")(jnp.asarray(x3)), _features(triple, x3))


# ---------------------------------------------------------------- FM-BCMRI small, generic


def test_fmbcmri_small_gets_its_12_heads_from_the_source(tmp_path):
    """vit_3d_small is 384 wide with 12 heads of 32; embed / 64 = 6 heads ported silently
    wrong features until 2026-12-05. (One block keeps the test small: depth is read from the
    file.)"""
    torch.manual_seed(3)
    reference = TorchViT3D(in_chans=1, img=16, patch=8, dim=384, depth=1, heads=12).eval()
    checkpoint = save_fmbcmri(reference, tmp_path / "small.pth.tar")
    report = port.port("fmbcmri", checkpoint, tmp_path / "port")
    assert report.architecture["num_heads"] == 12
    assert report.facts["num_heads"] == {"value": 12, "from": "source fmbcmri (embed 384)"}
    x = np.random.default_rng(3).standard_normal((2, 16, 16, 16, 1)).astype(np.float32)
    expected = _features(reference, x)
    assert_parity(ported(tmp_path / "port")(jnp.asarray(x)), expected)
    port.port("fmbcmri", checkpoint, tmp_path / "six", num_heads=6)
    assert json.loads((tmp_path / "six" / "port.json").read_text())["facts"]["num_heads"] == {
        "value": 6, "from": "flag --num_heads"}
    six = np.asarray(ported(tmp_path / "six")(jnp.asarray(x)))
    assert np.abs(six - expected).max() > 0.01 * np.abs(expected).max()


def test_facts_no_file_shows_are_refused_rather_than_guessed(tmp_path):
    resnet = save_medicalnet_release(tencent_medicalnet(10), tmp_path / "r10.pth")
    with pytest.raises(Her2jaxError, match=r"conv1_t_stride cannot be read .*--conv1_t_stride"):
        port.port("monai-resnet", resnet, tmp_path / "out")
    torch.manual_seed(0)
    tiny = TorchViT3D(**VIT_CONFIGS["tiny"])
    vit = save_fmbcmri(tiny, tmp_path / "vit.pth")
    plain = tmp_path / "timm.pth"   # a timm-style ViT's own state dict
    torch.save(tiny.timm_state_dict(), plain)
    with pytest.raises(Her2jaxError, match=r"num_heads cannot be read .*embed widths \[384, "
                                           r"768\], the checkpoint's is 48.*--num_heads"):
        port.port("fmbcmri", vit, tmp_path / "out")
    with pytest.raises(Her2jaxError, match=r"\(it ports any ViT\); pass --num_heads"):
        port.port("timm-vit3d", plain, tmp_path / "out")
    with pytest.raises(Her2jaxError, match="ResNet fact"):
        port.port("fmbcmri", vit, tmp_path / "out", num_heads=2, dilated=True)
    with pytest.raises(Her2jaxError, match="another source's layout"):
        port.port("medicalnet", save_lightning_ckpt(breastmrfm(), tmp_path / "bmr.ckpt"),
                  tmp_path / "out")
    assert not (tmp_path / "out").exists()
    port.port("timm-vit3d", plain, tmp_path / "generic", num_heads=2)
    x = np.random.default_rng(6).standard_normal((2, 16, 16, 16, 1)).astype(np.float32)
    assert_parity(ported(tmp_path / "generic")(jnp.asarray(x)), _features(tiny.eval(), x))
    port.port("monai-resnet", resnet, tmp_path / "monai", conv1_t_stride=2)
    assert port.read_port(tmp_path / "monai")["facts"]["dilated"] == {
        "value": False, "from": "source monai-resnet"}


def test_a_port_refuses_a_config_that_builds_another_network(tmp_path):
    """Shapes cannot tell a stride or a dilation: the config's facts are checked against
    port.json, one line naming the config key to set."""
    reference = tencent_medicalnet(10)
    port.port("medicalnet", save_medicalnet_release(reference, tmp_path / "r10.pth"),
              tmp_path / "port")
    config = load_config("resnet18")
    config.data.recipe.shape = (32, 32, 32)
    config.data.recipe.channels = ("C2",)
    config.model.resnet.update(depth=10, shortcut="B", bias_downsample=False, dilated=False)
    config.model.pretrained = str(tmp_path / "port")
    with pytest.raises(Her2jaxError, match=r"dilated=True \(source medicalnet\) but "
                                           r"model\.resnet\.dilated is False"):
        factory.build_model(config)
    config.model.resnet.dilated = True
    config.model.resnet.conv1_t_stride = 1
    with pytest.raises(Her2jaxError, match=r"model\.resnet\.conv1_t_stride=2"):
        factory.build_model(config)
    config.model.resnet.conv1_t_stride = 2
    model = factory.build_model(config)
    model.eval()
    x = np.random.default_rng(9).standard_normal((2, 32, 32, 32, 1)).astype(np.float32)
    assert_parity(model.features(jnp.asarray(x)), _features(reference, x))

    config = load_config("tiny_cpu")   # a ViT config
    config.model.pretrained = str(tmp_path / "port")
    with pytest.raises(Her2jaxError, match="holds a resnet3d encoder"):
        factory.build_model(config)


def test_cli_names_the_missing_fact_and_takes_the_flags(tmp_path):
    resnet = save_medicalnet_release(tencent_medicalnet(10), tmp_path / "r10.pth")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "her2jax.cli.port", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    refused = cli("--source=monai-resnet", f"--checkpoint={resnet}", f"--out={tmp_path / 'a'}")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "--conv1_t_stride" in lines[0]
    assert not (tmp_path / "a").exists()
    done = cli("--source=monai-resnet", f"--checkpoint={resnet}", f"--out={tmp_path / 'b'}",
               "--conv1_t_stride=2", "--dilated")
    assert done.returncode == 0, done.stderr
    assert "not in the weights: conv1_t_stride=2 (flag --conv1_t_stride), dilated=True " \
           "(flag --dilated)" in done.stdout
