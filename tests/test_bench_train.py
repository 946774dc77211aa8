"""benchmarks/bench_train.py: the smoke run's JSON lines, and that its PyTorch reference is
the same model and optimizer as her2jax's. No assertion on speed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_train.py"
# The smoke run covers the ViT training step (synthetic and pipeline input) and feature
# extraction; the ResNet's reference is checked in-process below (its XLA compilation would
# double the run on 2 cores).
SMOKE_CONFIGS = ("smoke_vit_b4", "smoke_vit_features_b4")
EXPECTED = {
    "smoke_vit_b4/her2jax", "smoke_vit_b4/her2jax/pipeline", "smoke_vit_b4/pytorch",
    "smoke_vit_b4/pytorch-compile", "smoke_vit_features_b4/her2jax",
    "smoke_vit_features_b4/pytorch", "smoke_vit_features_b4/pytorch-compile",
}
MEASURED_KEYS = (
    "name", "config", "framework", "mode", "input", "model", "batch", "input_shape", "dtype",
    "volumes_per_s", "step_ms", "step_ms_windows", "warmup_s", "flops_per_step",
    "flops_convention", "tflops_per_s", "mfu", "peak_tflops", "peak_memory_bytes", "device",
    "device_count", "versions", "reference", "date",
)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench_train")


@pytest.fixture(scope="module")
def ref():
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    return _load("torch_reference")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """(JSON lines, stderr) of one smoke run with pipeline input, on one CPU device."""
    pytest.importorskip("torch")
    env = dict(os.environ)
    # The script must work on one device: drop conftest's fake devices.
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--input=pipeline",
         "--configs=" + ",".join(SMOKE_CONFIGS)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path_factory.mktemp("bench"),
        env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return lines, proc.stderr


def test_smoke_prints_one_line_per_measurement(smoke_run):
    lines, stderr = smoke_run
    names = [line["name"] for line in lines]
    assert sorted(names) == sorted(EXPECTED)
    by_name = {line["name"]: line for line in lines}
    # torch.compile is skipped on a CPU in --smoke, and says so.
    for name in ("smoke_vit_b4/pytorch-compile", "smoke_vit_features_b4/pytorch-compile"):
        assert "torch.compile" in by_name[name]["skipped"]
        assert "volumes_per_s" not in by_name[name]
    assert "measurement" in stderr and "vol/s" in stderr      # the summary table


def test_smoke_lines_are_complete_and_consistent(smoke_run):
    lines, _ = smoke_run
    measured = [line for line in lines if "skipped" not in line]
    assert len(measured) == 5
    for line in measured:
        missing = [k for k in MEASURED_KEYS if k not in line]
        assert not missing, (line["name"], missing)
        assert "error" not in line
        for key in ("volumes_per_s", "step_ms", "tflops_per_s", "flops_per_step"):
            assert math.isfinite(line[key]) and line[key] > 0, (line["name"], key)
        assert line["step_ms"] == pytest.approx(float(np.median(line["step_ms_windows"])))
        assert line["volumes_per_s"] == pytest.approx(line["batch"] / line["step_ms"] * 1e3,
                                                      rel=1e-4)
        # Achieved TFLOP/s is the FLOPs of a step over its time.
        assert line["tflops_per_s"] == pytest.approx(
            line["flops_per_step"] / (line["step_ms"] * 1e-3) / 1e12, rel=1e-4)
        # No peak on a CPU unless given: no MFU; no device memory statistics.
        assert line["peak_tflops"] is None and line["mfu"] is None
        assert line["peak_memory_bytes"] is None or line["peak_memory_bytes"] > 0
        assert line["dtype"] == "float32" and line["device_count"] == 1
        assert line["input_shape"] == [16, 16, 16, 1] and line["batch"] == 4
        if line["mode"] == "train":
            assert math.isfinite(line["final_loss"])
        assert ("torch" if "pytorch" in line["framework"] else "jax") in line["versions"]


def test_both_frameworks_use_one_flop_count(smoke_run):
    lines, _ = smoke_run
    flops = {(m["config"], m["framework"], m["input"]): m["flops_per_step"]
             for m in lines if "skipped" not in m}
    train = flops[("smoke_vit_b4", "her2jax", "synthetic")]
    assert flops[("smoke_vit_b4", "pytorch", "synthetic")] == train
    assert flops[("smoke_vit_b4", "her2jax", "pipeline")] == train
    features = flops[("smoke_vit_features_b4", "her2jax", "synthetic")]
    assert flops[("smoke_vit_features_b4", "pytorch", "synthetic")] == features
    # Same model and batch: a training step counts 3 forward passes.
    assert train == pytest.approx(3 * features)


def test_ratios_are_recomputable(smoke_run):
    lines, _ = smoke_run
    rate = {(m["config"], m["framework"], m["input"]): m["volumes_per_s"]
            for m in lines if "skipped" not in m}
    for line in lines:
        if line["framework"] != "her2jax":
            assert "ratio_vs_pytorch" not in line
            continue
        theirs = rate[(line["config"], "pytorch", "synthetic")]
        assert line["ratio_vs_pytorch"] == pytest.approx(line["volumes_per_s"] / theirs,
                                                         rel=1e-3)
        assert "ratio_vs_pytorch_compile" not in line     # compile was skipped
    pipeline_line = next(m for m in lines if m["input"] == "pipeline")
    synthetic = rate[("smoke_vit_b4", "her2jax", "synthetic")]
    assert pipeline_line["e2e_over_synthetic"] == pytest.approx(
        pipeline_line["volumes_per_s"] / synthetic, rel=1e-3)
    assert pipeline_line["prepare_s"] > 0 and pipeline_line["train_examples"] >= 4
    assert all("e2e_over_synthetic" not in m for m in lines if m["input"] != "pipeline")


# ---------------------------------------------------------------- the reference is the same model


def _her2jax_params(bench, name):
    from flax import nnx

    config = bench.make_config(name, accelerator=False, dtype="float32")
    model = bench.host_initialised_model(config)
    return config, model, nnx.state(model, nnx.Param)


def _torch_model(ref, spec):
    if spec["encoder"] == "vit3d":
        return ref.ViT3D(in_channels=spec["in_channels"], input_shape=spec["input_shape"],
                         patch_size=spec["patch_size"], embed_dim=spec["embed_dim"],
                         depth=spec["depth"], num_heads=spec["num_heads"],
                         mlp_ratio=spec["mlp_ratio"], num_classes=spec["num_classes"])
    return ref.resnet(**{k: spec[k] for k in (
        "depth", "in_channels", "shortcut", "bias_downsample", "conv1_t_size",
        "conv1_t_stride", "widen_factor", "num_classes")})


@pytest.mark.parametrize("name", ["vit_b8_b64", "resnet18_b32", "smoke_vit_b4",
                                  "smoke_resnet_b4"])
def test_reference_has_the_same_parameters(bench, ref, name):
    import jax
    import torch
    from flax import nnx

    from her2jax.models import factory

    config = bench.make_config(name, accelerator=False, dtype="float32")
    # Shapes only on both sides.
    params = nnx.state(nnx.eval_shape(lambda: factory.build_model(config)), nnx.Param)
    ours = sorted(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    with torch.device("meta"):
        reference = _torch_model(ref, bench.model_spec(config))
    theirs = sorted(p.numel() for p in reference.parameters())
    assert len(ours) == len(theirs)
    assert sum(ours) == sum(theirs)
    assert ours == theirs
    if name == "vit_b8_b64":
        assert sum(ours) == pytest.approx(85.8e6, rel=0.01)   # ViT-B/8 on 1x48^3, 3 classes


@pytest.mark.parametrize("name", ["smoke_vit_b4", "smoke_resnet_b4"])
def test_reference_optimizer_groups_match_her2jax(bench, ref, name):
    """Per parameter size: the same layer id (learning-rate scale) and weight-decay flag."""
    import jax

    from her2jax.train import optim

    config, _, params = _her2jax_params(bench, name)
    spec = bench.model_spec(config)
    ours = sorted(zip(jax.tree.leaves(optim.layer_ids(params)),
                      jax.tree.leaves(optim.weight_decay_mask(params)),
                      (int(np.prod(x.shape)) for x in jax.tree.leaves(params)), strict=True))
    model = _torch_model(ref, spec)
    depth = spec["depth"] if spec["encoder"] == "vit3d" else None
    optimizer, _ = ref.make_optimizer(model, spec["train"], vit_depth=depth, fused=False)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    num_layers = max(layer for layer, _, _ in ours)
    theirs = []
    for p in model.parameters():
        group = group_of.pop(id(p))
        scale = group["initial_lr"] / spec["train"]["learning_rate"]
        layer = num_layers - round(math.log(scale) / math.log(config.train.layer_decay))
        assert scale == pytest.approx(config.train.layer_decay ** (num_layers - layer))
        theirs.append((layer, group["weight_decay"] > 0, p.numel()))
        if group["weight_decay"]:
            assert group["weight_decay"] == config.train.weight_decay
    assert not group_of
    assert ours == sorted(theirs)
    # The schedule: optax's warmup-cosine at the same steps.
    schedule = optim.learning_rate_schedule(config.train, config.train.steps)
    for step in (0, 1, 50, config.train.warmup_steps, 1000, config.train.steps - 1):
        factor = ref.learning_rate_factor(step, warmup_steps=config.train.warmup_steps,
                                          total_steps=config.train.steps)
        assert factor * config.train.learning_rate == pytest.approx(float(schedule(step)),
                                                                    rel=1e-5, abs=1e-12)


def test_reference_vit_computes_the_her2jax_function(bench, ref):
    """The tiny ViT with her2jax's weights copied in gives the same logits (float32)."""
    import torch
    from flax import nnx

    config, model, _ = _her2jax_params(bench, "smoke_vit_b4")
    reference = _torch_model(ref, bench.model_spec(config))
    names = dict(reference.named_parameters())
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        keys = [str(k) for k in path]
        value = np.asarray(variable.get_value(), np.float32)
        name = keys[-1]
        if name == "kernel":
            value = value.transpose(4, 3, 0, 1, 2) if value.ndim == 5 else value.T
        name = {"kernel": "weight", "scale": "weight"}.get(name, name)
        keys = keys[1:-1] if keys[0] == "encoder" else ["head"]
        target = names.pop(".".join([*keys, name]))
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    assert not names                                         # every parameter was copied
    np.testing.assert_allclose(reference.pos_embed.numpy(),
                               np.asarray(model.encoder.pos_embed[...]), atol=1e-6)

    x = np.random.default_rng(1).standard_normal((3, 16, 16, 16, 1)).astype(np.float32)
    model.eval()
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    with torch.no_grad():
        theirs = reference.eval()(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_reference_resnet_trains_one_step(bench, ref):
    """The MONAI ResNet reference's step runs in channels_last_3d and changes the weights."""
    import torch

    config = bench.make_config("smoke_resnet_b4", accelerator=False, dtype="float32")
    spec = bench.model_spec(config)
    torch.manual_seed(0)
    model = _torch_model(ref, spec).to(memory_format=torch.channels_last_3d).train()
    # Without warmup: the warmup schedule's learning rate is 0 at step 0.
    optimizer, scheduler = ref.make_optimizer(model, {**spec["train"], "warmup_steps": 0},
                                              vit_depth=None, fused=True)
    step = ref.TrainStep(model, optimizer, scheduler, model.parameters(),
                         augment_config=spec["train"]["augment"],
                         grad_clip=spec["train"]["grad_clip"], class_weights=torch.ones(3),
                         autocast_dtype=None)
    host = bench.synthetic_batch(4, [16, 16, 16, 1], 3)
    image = torch.from_numpy(host["image"]).permute(0, 4, 1, 2, 3).contiguous(
        memory_format=torch.channels_last_3d)
    before = model.net.conv1.weight.detach().clone()
    loss = step(image, torch.from_numpy(host["label"]).long())
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.net.conv1.weight)
    probs, features = ref.FeatureStep(model.features, model.head, autocast_dtype=None)(image)
    assert probs.shape == (4, 3) and features.shape == (4, 64)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
