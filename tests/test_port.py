"""her2jax-port against independent PyTorch references: MONAI ResNets and a ViT built from
PyTorch built-ins, saved the way FM-BCMRI and MedicalNet save theirs, ported without torch,
and compared feature for feature (max |diff| <= 1e-4 * max |reference|, float32)."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from her2jax.errors import Her2jaxError
from her2jax.models import port, resnet3d, vit3d

# Every test here writes its checkpoints with torch (the `parity` extra); without it they skip.
torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


def assert_parity(ours, reference) -> None:
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    assert ours.shape == reference.shape
    scale = float(np.abs(reference).max())
    diff = float(np.abs(ours - reference).max())
    assert diff <= TOLERANCE * scale, f"max |diff| {diff:.3g} > {TOLERANCE} x {scale:.3g}"


def to_torch(x: np.ndarray) -> torch.Tensor:
    """Flax [B, D, H, W, C] -> PyTorch [B, C, D, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def ported(directory: Path) -> nnx.Module:
    """The encoder a port describes, its state restored from the port (never initialised)."""
    meta = port.read_port(directory)
    model = nnx.eval_shape(lambda: port.build_encoder(meta["architecture"]))
    port.load_pretrained(model, directory)
    model.eval()
    return model


# ---------------------------------------------------------------- MedicalNet / MONAI ResNets


def monai_resnet(depth: int, in_channels: int = 1) -> torch.nn.Module:
    """MONAI's ResNet with MedicalNet's arguments, random weights and BatchNorm statistics."""
    torch.manual_seed(depth)
    bias_downsample, shortcut = monai_nets.resnet.get_medicalnet_pretrained_resnet_args(depth)
    model = getattr(monai_nets, f"resnet{depth}")(
        spatial_dims=3, n_input_channels=in_channels, conv1_t_stride=2, feed_forward=False,
        shortcut_type=shortcut, bias_downsample=bias_downsample)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def save_medicalnet(model: torch.nn.Module, path: Path, *, legacy: bool = False) -> Path:
    """MedicalNet's layout: {"state_dict": {"module." + key: tensor}}."""
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("depth", [10, 18, 50])
def test_monai_resnets_match_monai(depth, tmp_path):
    """MedicalNet's weights in MONAI's (undilated) network: ``monai-resnet`` with the stride
    MONAI's pretrained=True uses (test_port_sources.py has the network they were trained in)."""
    reference = monai_resnet(depth)
    checkpoint = save_medicalnet(reference, tmp_path / f"resnet_{depth}.pth")
    report = port.port("monai-resnet", checkpoint, tmp_path / "port", conv1_t_stride=2)
    assert report.architecture["depth"] == depth
    assert report.architecture["shortcut"] == ("A" if depth in (18, 34) else "B")
    assert not any(k.endswith("num_batches_tracked") for k in report.mapped)
    x = np.random.default_rng(depth).standard_normal((2, 32, 40, 48, 1)).astype(np.float32)
    with torch.no_grad():
        expected = reference(to_torch(x)).numpy()
    assert_parity(ported(tmp_path / "port")(jnp.asarray(x)), expected)


def test_resnet_first_layer_inflates_to_three_channels(tmp_path):
    single = monai_resnet(18)
    checkpoint = save_medicalnet(single, tmp_path / "resnet_18.pth")
    report = port.port("monai-resnet", checkpoint, tmp_path / "port", in_channels=3,
                       conv1_t_stride=2)
    assert report.inflation == {"key": "conv1.weight", "from_channels": 1, "to_channels": 3}
    # The PyTorch reference with the same inflated kernel.
    triple = monai_resnet(18, in_channels=3)
    state = single.state_dict()
    state["conv1.weight"] = state["conv1.weight"].repeat(1, 3, 1, 1, 1) / 3
    triple.load_state_dict(state)
    x = np.random.default_rng(1).standard_normal((2, 24, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = triple(to_torch(x)).numpy()
        # Inflation keeps the single-channel response to a channel-constant input.
        same = single(to_torch(x[..., :1])).numpy()
        spread = triple(to_torch(np.repeat(x[..., :1], 3, axis=-1))).numpy()
    np.testing.assert_allclose(spread, same, rtol=1e-4, atol=1e-4 * np.abs(same).max())
    assert_parity(ported(tmp_path / "port")(jnp.asarray(x)), expected)


# ---------------------------------------------------------------- FM-BCMRI ViT


def torch_pos_embed(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """FM-BCMRI's fixed 3D sin-cos embedding, built with torch ops (REFERENCE.md)."""
    pos_dim = dim // 6
    omega = 1.0 / 10000 ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    h, w, d = torch.meshgrid(*(torch.arange(g, dtype=torch.float32) for g in grid),
                             indexing="ij")
    parts = []
    for axis in (h, w, d):
        angles = torch.einsum("m,d->md", axis.flatten(), omega)
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0)[None]


class TorchViT3D(torch.nn.Module):
    """A 3D ViT from PyTorch built-ins: no her2jax (or timm) code."""

    def __init__(self, *, in_chans, img, patch, dim, depth, heads):
        super().__init__()
        self.patch_embed = torch.nn.Conv3d(in_chans, dim, patch, stride=patch)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        grid = (img // patch,) * 3
        self.register_buffer("pos_embed", torch_pos_embed(grid, dim))
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                             activation="gelu", layer_norm_eps=1e-6,
                                             batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.head = torch.nn.Linear(dim, 256)   # MoCo's projector stand-in: must be dropped
        with torch.no_grad():   # non-trivial norms, so a swapped scale / bias shows
            for module in self.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The same weights under FM-BCMRI's timm-style names."""
        state = {"cls_token": self.cls_token, "pos_embed": self.pos_embed,
                 "patch_embed.proj.weight": self.patch_embed.weight,
                 "patch_embed.proj.bias": self.patch_embed.bias,
                 "norm.weight": self.norm.weight, "norm.bias": self.norm.bias,
                 "head.weight": self.head.weight, "head.bias": self.head.bias}
        for i, block in enumerate(self.blocks):
            names = {"norm1": block.norm1, "norm2": block.norm2, "mlp.fc1": block.linear1,
                     "mlp.fc2": block.linear2, "attn.proj": block.self_attn.out_proj}
            for name, module in names.items():
                state[f"blocks.{i}.{name}.weight"] = module.weight
                state[f"blocks.{i}.{name}.bias"] = module.bias
            state[f"blocks.{i}.attn.qkv.weight"] = block.self_attn.in_proj_weight
            state[f"blocks.{i}.attn.qkv.bias"] = block.self_attn.in_proj_bias
        return {k: v.detach().clone() for k, v in state.items()}


def save_fmbcmri(model: TorchViT3D, path: Path, *, legacy: bool = False) -> Path:
    """FM-BCMRI's layout: MoCo v3's base and momentum encoders under "state_dict"."""
    state = {}
    for key, value in model.timm_state_dict().items():
        state["base_encoder." + key] = value
        state["momentum_encoder." + key] = value.clone()
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


VIT_CONFIGS = {
    "tiny": dict(in_chans=1, img=16, patch=8, dim=48, depth=2, heads=2),
    "base": dict(in_chans=1, img=48, patch=8, dim=768, depth=12, heads=12),
}


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_fmbcmri_vit_matches_a_pytorch_reference(size, tmp_path):
    torch.manual_seed(0)
    cfg = VIT_CONFIGS[size]
    reference = TorchViT3D(**cfg).eval()
    checkpoint = save_fmbcmri(reference, tmp_path / "breast_MR_checkpoint.pth.tar")
    report = port.port("fmbcmri", checkpoint, tmp_path / "port", num_heads=cfg["heads"])
    arch = report.architecture
    assert (arch["embed_dim"], arch["depth"], arch["patch_size"], arch["input_shape"]) == (
        cfg["dim"], cfg["depth"], cfg["patch"], [cfg["img"]] * 3)
    assert not report.computed, "pos_embed comes from the checkpoint"
    assert any(k.startswith("momentum_encoder.") for k in report.dropped)
    assert "base_encoder.head.weight" in report.dropped
    x = np.random.default_rng(0).standard_normal((2, *[cfg["img"]] * 3, 1)).astype(np.float32)
    with torch.no_grad():
        expected = reference(to_torch(x)).numpy()
    assert_parity(ported(tmp_path / "port")(jnp.asarray(x)), expected)
    del reference
    if size == "base":
        assert report.architecture["num_heads"] == 12 == 768 // 64


def test_pos_embed_is_loaded_and_equals_our_construction(tmp_path):
    cfg = VIT_CONFIGS["tiny"]
    torch_table = torch_pos_embed((6, 6, 6), 768).numpy()[0]
    np.testing.assert_allclose(vit3d.sincos_pos_embed_3d((6, 6, 6), 768), torch_table,
                               atol=1e-6)
    assert torch_table.shape == (217, 768) and not torch_table[0].any()
    # The port uses the stored tensor, not its own: perturb it and look.
    torch.manual_seed(0)
    reference = TorchViT3D(**cfg).eval()
    reference.pos_embed += 0.25
    checkpoint = save_fmbcmri(reference, tmp_path / "ckpt.pth")
    port.port("fmbcmri", checkpoint, tmp_path / "port", num_heads=2)
    model = ported(tmp_path / "port")
    np.testing.assert_allclose(np.asarray(model.pos_embed[...]),
                               reference.pos_embed.numpy(), atol=1e-7)


def test_missing_pos_embed_is_computed_and_reported(tmp_path):
    torch.manual_seed(0)
    reference = TorchViT3D(**VIT_CONFIGS["tiny"]).eval()
    state = {"base_encoder." + k: v for k, v in reference.timm_state_dict().items()
             if k != "pos_embed"}
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth")
    report = port.port("fmbcmri", tmp_path / "ckpt.pth", tmp_path / "port", num_heads=2)
    assert report.computed == ["pos_embed"]
    assert report.architecture["input_shape"] == [48] * 3   # FM-BCMRI's default grid
    assert json.loads((tmp_path / "port" / "port.json").read_text())["computed"] == ["pos_embed"]


def test_vit_patch_embed_inflates_to_three_channels(tmp_path):
    torch.manual_seed(0)
    cfg = VIT_CONFIGS["tiny"]
    single = TorchViT3D(**cfg).eval()
    port.port("fmbcmri", save_fmbcmri(single, tmp_path / "ckpt.pth"), tmp_path / "port",
              num_heads=2, in_channels=3)
    triple = TorchViT3D(**{**cfg, "in_chans": 3}).eval()
    state = single.state_dict()
    state["patch_embed.weight"] = state["patch_embed.weight"].repeat(1, 3, 1, 1, 1) / 3
    triple.load_state_dict(state)
    x = np.random.default_rng(2).standard_normal((2, 16, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        expected = triple(to_torch(x)).numpy()
    assert_parity(ported(tmp_path / "port")(jnp.asarray(x)), expected)


# ---------------------------------------------------------------- serialisations


def test_legacy_serialisation_ports_too(tmp_path):
    resnet = monai_resnet(10)
    checkpoint = save_medicalnet(resnet, tmp_path / "resnet_10.pth", legacy=True)
    with open(checkpoint, "rb") as f:
        assert f.read(2) != b"PK", "legacy files are a pickle stream, not a zip"
    port.port("monai-resnet", checkpoint, tmp_path / "resnet", conv1_t_stride=2)
    x = np.random.default_rng(3).standard_normal((1, 24, 24, 24, 1)).astype(np.float32)
    with torch.no_grad():
        assert_parity(ported(tmp_path / "resnet")(jnp.asarray(x)), resnet(to_torch(x)).numpy())

    torch.manual_seed(0)
    vit = TorchViT3D(**VIT_CONFIGS["tiny"]).eval()
    port.port("fmbcmri", save_fmbcmri(vit, tmp_path / "vit.pth", legacy=True),
              tmp_path / "vit", num_heads=2)
    x = np.random.default_rng(4).standard_normal((2, 16, 16, 16, 1)).astype(np.float32)
    with torch.no_grad():
        assert_parity(ported(tmp_path / "vit")(jnp.asarray(x)), vit(to_torch(x)).numpy())


def test_port_json_records_source_hash_and_counts(tmp_path):
    checkpoint = save_medicalnet(monai_resnet(10), tmp_path / "resnet_10.pth")
    port.port("medicalnet", checkpoint, tmp_path / "port", in_channels=2)
    meta = json.loads((tmp_path / "port" / "port.json").read_text())
    import hashlib

    assert meta["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["source"] == "medicalnet" and meta["num_missing"] == 0
    n_tensors = sum(1 for k in torch.load(checkpoint)["state_dict"]
                    if not k.endswith("num_batches_tracked"))
    assert meta["num_mapped"] == n_tensors
    assert meta["inflation"]["to_channels"] == 2 and meta["architecture"]["in_channels"] == 2
    # Every architecture fact says where it came from.
    facts = meta["facts"]
    assert set(facts) == set(meta["architecture"])
    assert facts["depth"] == {"value": 10, "from": "file"}
    assert facts["conv1_t_stride"] == {"value": 2, "from": "source medicalnet"}
    assert facts["dilated"] == {"value": True, "from": "source medicalnet"}
    assert facts["in_channels"]["from"].startswith("flag --in_channels")


# ---------------------------------------------------------------- safety and bad input


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = monai_resnet(10).state_dict()
    state["module.evil"] = _Payload(marker)
    torch.save({"state_dict": state}, tmp_path / "evil.pth")
    with pytest.raises(Her2jaxError, match=r"os\.system|posix\.system"):
        port.port("medicalnet", tmp_path / "evil.pth", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
    # And the pickle payload really does run when unpickled naively.
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "her2jax.cli.port", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def resnet10_checkpoint(tmp_path_factory) -> Path:
    return save_medicalnet(monai_resnet(10), tmp_path_factory.mktemp("ckpt") / "resnet_10.pth")


def _bad_checkpoint(how: str, good: Path, tmp_path: Path) -> tuple[str, Path, str]:
    """(source, checkpoint, text the error must contain)."""
    if how == "truncated":
        path = tmp_path / "cut.pth"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return "medicalnet", path, "cut.pth"
    if how == "wrong source":
        return "fmbcmri", good, "--source=medicalnet"
    if how == "missing keys":
        state = torch.load(good)["state_dict"]
        del state["module.layer3.0.bn2.running_var"]
        torch.save({"state_dict": state}, tmp_path / "partial.pth")
        return "medicalnet", tmp_path / "partial.pth", "layer3.0.bn2.var"
    if how == "wrong shapes":
        state = torch.load(good)["state_dict"]
        state["module.layer2.0.conv1.weight"] = torch.zeros(128, 64, 3, 3, 5)
        torch.save({"state_dict": state}, tmp_path / "shapes.pth")
        return "medicalnet", tmp_path / "shapes.pth", "(128, 64, 3, 3, 5)"
    if how == "a directory":
        (tmp_path / "dir.pth").mkdir()
        return "medicalnet", tmp_path / "dir.pth", "dir.pth"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "wrong source", "missing keys", "wrong shapes",
                                 "a directory"])
def test_bad_checkpoints_are_one_line_errors(how, resnet10_checkpoint, tmp_path):
    source, checkpoint, named = _bad_checkpoint(how, resnet10_checkpoint, tmp_path)
    with pytest.raises(Her2jaxError) as error:
        port.port(source, checkpoint, tmp_path / "out")
    assert named in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_cli_ports_and_reports_and_exits_2_on_bad_input(resnet10_checkpoint, tmp_path):
    result = _cli("--source=medicalnet", f"--checkpoint={resnet10_checkpoint}",
                  f"--out={tmp_path / 'ok'}")
    assert result.returncode == 0, result.stderr
    assert "mapped" in result.stdout and "missing 0, unexpected 0" in result.stdout
    assert (tmp_path / "ok" / "port.json").exists()

    again = _cli("--source=medicalnet", f"--checkpoint={resnet10_checkpoint}",
                 f"--out={tmp_path / 'ok'}")
    assert again.returncode == 2 and "--overwrite" in again.stderr

    source, checkpoint, named = _bad_checkpoint("wrong shapes", resnet10_checkpoint, tmp_path)
    bad = _cli(f"--source={source}", f"--checkpoint={checkpoint}", f"--out={tmp_path / 'bad'}")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and named in lines[0], bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()


def test_cli_output_follows_the_umask(resnet10_checkpoint, tmp_path):
    """Like everything the console scripts write: run under umask 022, her2jax-port's umask
    027 gives folders 0750 and files 0640 (the output folder, made by mkdtemp and renamed into
    place, used to stay 0700)."""
    out = tmp_path / "ports" / "r10"
    result = subprocess.run([sys.executable, "-m", "her2jax.cli.port", "--source=medicalnet",
                             f"--checkpoint={resnet10_checkpoint}", f"--out={out}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, umask=0o022)
    assert result.returncode == 0, result.stderr
    paths = [out.parent, out, *sorted(out.rglob("*"))]
    assert len(paths) > 4
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in paths}
    assert {p: m for p, m in modes.items() if (tmp_path / p).is_dir() and m != "0o750"} == {}
    assert {p: m for p, m in modes.items()
            if not (tmp_path / p).is_dir() and m != "0o640"} == {}


def test_a_port_does_not_load_into_another_architecture(resnet10_checkpoint, tmp_path):
    port.port("medicalnet", resnet10_checkpoint, tmp_path / "port")
    other = nnx.eval_shape(lambda: resnet3d.ResNet3D(depth=18, in_channels=1, rngs=nnx.Rngs(0)))
    with pytest.raises(Her2jaxError, match="does not fit this encoder"):
        port.load_pretrained(other, tmp_path / "port")


def test_port_never_imports_torch(resnet10_checkpoint, tmp_path):
    code = (f"import sys; from her2jax.models import port; "
            f"port.port('medicalnet', {str(resnet10_checkpoint)!r}, {str(tmp_path / 'p')!r}); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_tolerance_helper_can_fail():
    with pytest.raises(AssertionError):
        assert_parity(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 2 * TOLERANCE * 2]))
    assert math.isclose(TOLERANCE, 1e-4)
