"""Training-step throughput of her2jax against a PyTorch reference of the same model.

  python benchmarks/bench_train.py [--configs=vit_b8_b64,resnet18_b32,...]
      [--frameworks=her2jax,pytorch,pytorch-compile] [--input=synthetic|pipeline]
      [--dtype=auto|bfloat16|float32] [--warmup=5] [--steps=20] [--repeat=3]
      [--batch=N] [--peak_tflops=X] [--compile=auto|on|off] [--no-augment] [--smoke]
      [--variants=attn_xla,...] [--jsonl=FILE] [--budget_s=S] [--profile_dir=DIR]
      [--hlo_dir=DIR]

(``benchmarks/gpu_session.sh`` runs the GPU measurements as stages that fit a lent device's
calls; ``benchmarks/device_wheels.sh`` fetches the wheels its image lacks.)

Every measurement runs in a process of its own (this script, re-started with ``--child``),
so device memory statistics, compilation caches and allocator state start clean. The parent
counts FLOPs (on JAX's CPU backend only), prepares the pipeline's data, runs the children one
after the other, then prints one JSON line per measurement and a summary table on stderr.

Configurations (``--configs``; ``--smoke`` selects the ``smoke_*`` ones):

  vit_b8_b64, vit_b8_b128     FM-BCMRI ViT-B/8 on 1x48^3 (217 tokens), configs/h100.py
  resnet18_b32, resnet18_b64  MedicalNet ResNet-18, 3 channels x 64x96x96 (D, H, W),
                              configs/resnet18.py at that shape
  vit_b8_features_b128        forward only (feature extraction): ``step.make_predict``
                              against a PyTorch ``inference_mode`` forward
  vit_b8_pretrain_b64         MoCo v3 pretraining (``--mode=pretrain``) of the ViT-B/8,
                              configs/pretrain_vit.py's heads (4096 -> 256) and optimizer,
                              against a PyTorch MoCo v3 of the same networks
  smoke_vit_b4, smoke_resnet_b4, smoke_vit_features_b4, smoke_vit_pretrain_b4
                              the same code paths at CI size: ViT-tiny/8 on 1x16^3, ResNet-10
                              at widen 0.125 on 1x16^3, batch 4 (pretraining heads 64 -> 32)

What runs:

- her2jax: the real engine step. The model from ``factory.build_model(config)`` (parameters
  drawn on the host: see ``host_initialised_model``), AdamW from
  ``optim.make_optimizer(config.train)`` (layer-wise decay, clipping, warmup-cosine schedule),
  the state from ``state.create``, ``step.make_train_step`` with the config's on-device
  augmentation and balanced class weights, batches as global ``jax.Array`` s sharded over the
  ``data`` axis of ``step_lib.make_mesh()`` (``pipeline.to_global``). On a GPU with bfloat16 the
  ViT keeps configs/h100.py's cuDNN attention (tokens padded to 64); elsewhere attention is
  XLA's. ``--input=synthetic`` (default) makes one device batch of float16 volumes (the
  dataset's dtype) and feeds it to every step. ``--input=pipeline`` adds, for every training
  configuration, an end-to-end line: the same step fed, as in training, by
  ``pipeline.train_batches`` + ``device_batches`` (the config's ``data.device_prefetch``
  batches copied ahead) from ArrayRecord shards that the parent prepares first from a
  phantom cohort (``phantom.write_cohort`` + ``prepare.prepare``, the configuration's
  recipe; all labelled cases train; epochs repeat). Its ``e2e_over_synthetic`` is its
  volumes/s over the synthetic-input line's.
- PyTorch reference (``benchmarks/torch_reference.py``; every line's ``reference`` field
  says the same): the same model (a 3D ViT from ``nn.Conv3d`` / ``nn.Linear`` /
  ``nn.LayerNorm`` / ``F.scaled_dot_product_attention`` mirroring her2jax's ViT3D; MONAI's
  ``resnet18(spatial_dims=3, n_input_channels=3, num_classes=3, shortcut_type="A",
  bias_downsample=True, conv1_t_stride=2)`` in ``channels_last_3d``, cudnn.benchmark on),
  the same batch, input dtype, augmentation (flips, scale, shift, noise on the device),
  class-weighted cross-entropy, AdamW hyper-parameters, layer-wise learning-rate groups,
  weight-decay mask, gradient clipping and warmup-cosine schedule. Mixed precision is
  ``torch.autocast(bfloat16)`` when the dtype is bfloat16 (float32 otherwise). The optimizer
  is ``torch.optim.AdamW(fused=True)`` where PyTorch supports it, else ``foreach=True``
  (the line's ``torch_optimizer`` says which). ``pytorch-compile`` is the same with
  ``torch.compile(model)`` (default mode; the optimizer step stays eager). It is skipped in
  ``--smoke`` on a CPU (``--compile=auto``): one tiny model took ~40 s to compile on the
  2-core CI machine.
- Pretraining (``vit_b8_pretrain_b64``): her2jax's ``pretrain.make_pretrain_step`` (two views
  drawn on the device, the momentum update, keys all-gathered over ``data``, SyncBatchNorm
  heads, the symmetric contrastive loss, AdamW with the frozen patch projection) against
  ``torch_reference.MoCoV3`` + ``PretrainStep``: the same encoder, projector (3 layers),
  predictor (2), momentum copy, views (random resized crop by ``F.grid_sample``, flips,
  intensity, a 5-tap separable blur, noise), loss and AdamW (kernels decayed, the patch
  projection frozen), on one device; ``pytorch-compile`` compiles the query network.

Timing: ``--warmup`` steps (compilation included, reported as ``warmup_s``), then
``--repeat`` windows of ``--steps`` steps each. Inside a window nothing waits on the device;
the window ends with ``jax.block_until_ready`` on the state and metrics
(``torch.cuda.synchronize`` for PyTorch), and its time is divided by its steps.
``step_ms`` is the median over the windows (``step_ms_windows`` lists them);
``volumes_per_s`` = batch / step time.

FLOP convention: one volume's forward FLOPs from XLA's cost analysis of the jitted her2jax
forward pass (eval mode, batch 1, float32, XLA attention, compiled for the CPU backend, so
the count is the same on every machine and dtype; it counts every HLO op, so it is ~1.6 %
above the matmul-only estimate for the ViT). A training step costs 3 x forward x batch
(backward = 2 x forward; optimizer, augmentation and the ResNet's unneeded input gradient
are ignored), a feature-extraction step forward x batch, a MoCo v3 step 8 x forward x batch
(two views through the query network, forward and backward, and through the key network,
forward; the heads' MLPs are < 0.1 % of the ViT-B's FLOPs and not counted). Both frameworks' lines use the
same count: ``tflops_per_s`` = ``flops_per_step`` / step time / 1e12, and
``mfu`` = ``tflops_per_s`` / (``peak_tflops`` x ``device_count``). The default peak is
989 TFLOP/s per device (H100 SXM / H200 dense bfloat16) on those GPUs with bfloat16, else
none (``mfu`` null) unless ``--peak_tflops`` is given.

A/B variants (``--variants``): each named change to the her2jax step (``VARIANTS``: XLA
instead of cuDNN attention, 224 instead of 256 padded tokens, no augmentation, no layer-wise
learning-rate scales, cuBLAS-only matmuls, no device prefetch) runs as one more her2jax
measurement per configuration and input it applies to, named
``config/her2jax+variant[/pipeline]``, after
the unchanged ones; ``ratio_vs_base`` is its volumes/s over the unchanged step's with the same
input. ``--profile_dir`` traces 3 more steps of every her2jax measurement after its timing
(``jax.profiler``, Perfetto JSON and XPlane; ``trace_summary.py`` reads them) and
``--hlo_dir`` saves each her2jax training or pretraining step's optimised HLO (the
executable that is then timed). ``--jsonl`` appends each line to a file as soon as its measurement ends, so a
run cut short keeps what it measured; ``--budget_s`` skips what cannot start in time.

``--batch=N`` overrides every selected configuration's global batch (names become
``config@bN/...``); on the 2-core CI machine the full ViT-B/8 runs at ``--batch=4`` (XLA's
CPU backend asks for one 21 GB buffer at batch 64 in float32).

JSON fields of a measurement: name (config[@bN]/framework[+variant][/pipeline]), config,
variant (null, or a key of VARIANTS, with variant_what and ratio_vs_base), framework
(her2jax | pytorch | pytorch-compile), mode (train | features), input, model, batch,
input_shape ([D, H, W, C]), dtype, volumes_per_s, step_ms, step_ms_windows, warmup_s,
flops_per_step, flops_convention, tflops_per_s, mfu, peak_tflops, peak_memory_bytes
(jax: ``peak_bytes_in_use`` of the first device; torch: ``max_memory_allocated``; null on a
CPU), final_loss (train), device, device_count, versions, reference, date; her2jax lines add
ratio_vs_pytorch and ratio_vs_pytorch_compile (her2jax volumes/s over PyTorch's, synthetic
input, where PyTorch ran), pipeline lines e2e_over_synthetic, prepare_s, cohort_patients,
train_examples and workers; PyTorch lines torch_optimizer, autocast and torch_threads; her2jax
ViT lines attention ('cudnn' or 'xla') and attention_pad; profiled lines profile (the trace
folder). A measurement
that is skipped has ``skipped`` (the reason) instead of the figures; one that failed has
``error``, and the script then exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("her2jax", "pytorch", "pytorch-compile")
FLOP_CONVENTION = ("training step = 3 x forward x batch, feature step = forward x batch, "
                   "MoCo v3 pretraining step = 8 x forward x batch; "
                   "forward = XLA cost analysis of the her2jax forward (batch 1, float32, "
                   "XLA attention, CPU backend)")
REFERENCE = ("PyTorch: same model (ViT: nn.Conv3d patch embedding, nn.Linear/nn.LayerNorm, "
             "F.scaled_dot_product_attention; ResNet: MONAI resnet, channels_last_3d, "
             "cudnn.benchmark), same batch, float16 input, on-device augmentation, "
             "class-weighted cross-entropy; torch.autocast(bfloat16) when dtype is bfloat16; "
             "torch.optim.AdamW(fused=True where supported, else foreach) in layer-decay and "
             "weight-decay groups, clip_grad_norm_, LambdaLR warmup-cosine; "
             "pytorch-compile = torch.compile(model), default mode; features: eval mode "
             "under torch.inference_mode; pretraining: torch_reference.MoCoV3 (same encoder, "
             "heads, momentum copy, views by F.grid_sample, loss, AdamW with the patch "
             "projection frozen), one device")
# Dense bfloat16 datasheet peaks, TFLOP/s per device.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
PROFILE_STEPS = 3


@dataclasses.dataclass(frozen=True)
class Bench:
    """One configuration: which model (the config file's), global batch and mode."""

    encoder: str          # 'vit3d' | 'resnet3d'
    batch: int
    mode: str = "train"   # 'train' | 'features' | 'pretrain'
    smoke: bool = False


BENCHES = {
    "vit_b8_b64": Bench("vit3d", 64),
    "vit_b8_b128": Bench("vit3d", 128),
    "resnet18_b32": Bench("resnet3d", 32),
    "resnet18_b64": Bench("resnet3d", 64),
    "vit_b8_features_b128": Bench("vit3d", 128, "features"),
    "vit_b8_pretrain_b64": Bench("vit3d", 64, "pretrain"),
    "smoke_vit_b4": Bench("vit3d", 4, smoke=True),
    "smoke_resnet_b4": Bench("resnet3d", 4, smoke=True),
    "smoke_vit_features_b4": Bench("vit3d", 4, "features", smoke=True),
    "smoke_vit_pretrain_b4": Bench("vit3d", 4, "pretrain", smoke=True),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One change to the her2jax step, measured beside the unchanged step (A/B).

    Attributes:
      what: one line for BENCHMARKS.md.
      config: dotted config keys -> values, applied after the benchmark's own config.
      xla_flags: appended to XLA_FLAGS in the child's environment.
      encoders: the encoders it applies to.
      inputs: the inputs it applies to.
    """

    what: str
    config: tuple = ()
    xla_flags: str = ""
    encoders: tuple = ("vit3d", "resnet3d")
    inputs: tuple = ("synthetic", "pipeline")


# Changes to the device step are measured on synthetic input only (the pipeline adds nothing
# to what they change); the input-side one on pipeline input only.
_DEVICE = ("synthetic",)
VARIANTS = {
    "attn_xla": Variant("XLA's own attention instead of cuDNN's (no token padding)",
                        (("model.vit.attention", "xla"), ("model.vit.attention_pad", 0)),
                        encoders=("vit3d",), inputs=_DEVICE),
    "attn_pad32": Variant("cuDNN attention over 224 tokens (217 padded to a multiple of 32) "
                          "instead of 256 (multiple of 64)",
                          (("model.vit.attention_pad", 32),), encoders=("vit3d",),
                          inputs=_DEVICE),
    "no_augment": Variant("no on-device augmentation (flips, scale, shift, noise): its cost",
                          (("train.augment.flips", False), ("train.augment.scale", 0.0),
                           ("train.augment.shift", 0.0), ("train.augment.noise", 0.0)),
                          inputs=_DEVICE),
    "no_layer_decay": Variant("layer_decay 1 (no per-layer learning-rate scales): their "
                              "cost in the optimizer", (("train.layer_decay", 1.0),),
                              inputs=_DEVICE),
    "cublas_gemm": Variant("XLA GPU matmuls through cuBLAS only (no Triton GEMM fusions)",
                           xla_flags="--xla_gpu_enable_triton_gemm=false", inputs=_DEVICE),
    "no_device_prefetch": Variant("pipeline batches copied to the device when asked for "
                                  "instead of 2 ahead", (("data.device_prefetch", 0),),
                                  inputs=("pipeline",)),
}

DEFAULT_CONFIGS = ("vit_b8_b64", "vit_b8_b128", "resnet18_b32", "resnet18_b64",
                   "vit_b8_features_b128", "vit_b8_pretrain_b64")
SMOKE_CONFIGS = ("smoke_vit_b4", "smoke_resnet_b4", "smoke_vit_features_b4",
                 "smoke_vit_pretrain_b4")


# ----------------------------------------------------------------------------------------------
# Configurations


def _load_config(filename: str):
    spec = importlib.util.spec_from_file_location(Path(filename).stem, REPO / "configs" / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def make_config(name: str, *, accelerator: bool, dtype: str, batch: int | None = None,
                variant: str | None = None):
    """The full her2jax config of benchmark ``name``.

    Args:
      name: a key of ``BENCHES``.
      accelerator: True on a GPU (keeps configs/h100.py's cuDNN attention for half dtypes).
      dtype: 'float32' or 'bfloat16', the model's compute dtype.
      batch: the global batch (default: the benchmark's).
      variant: a key of ``VARIANTS`` whose config changes are applied last.
    """
    from her2jax.data import recipes

    bench = BENCHES[name]
    h100 = _load_config("h100.py")
    if bench.encoder == "vit3d":
        config = h100
        if bench.smoke:
            config.model.vit.size = "tiny"
            config.data.recipe.shape = (16, 16, 16)
        if not accelerator or dtype == "float32":
            config.model.vit.attention = "xla"
            config.model.vit.attention_pad = 0
    else:
        config = _load_config("resnet18.py")
        # The figures compare with MONAI's resnet18 in PyTorch: its undilated network (the
        # config's MedicalNet network keeps layers 3-4 at 4x the voxels).
        config.model.resnet.dilated = False
        config.data.worker_count = h100.data.worker_count
        config.data.prefetch = h100.data.prefetch
        config.data.recipe.shape = (64, 96, 96)
        if bench.smoke:
            config.data.recipe = recipes.recipe_config("fmbcmri")
            config.data.recipe.shape = (16, 16, 16)
            config.model.resnet.depth = 10
            config.model.resnet.widen_factor = 0.125
    if bench.mode == "pretrain":
        # configs/pretrain_vit.py's MoCo v3 heads and optimizer on the benchmark's network.
        pretraining = _load_config("pretrain_vit.py")
        config.pretrain = pretraining.pretrain
        for key in ("learning_rate", "weight_decay", "grad_clip", "layer_decay",
                    "warmup_steps", "steps"):
            config.train[key] = pretraining.train[key]
        if bench.smoke:
            config.pretrain.update(dim=32, mlp_dim=64)
    config.model.dtype = dtype
    config.train.batch_size = batch or bench.batch
    # Every labelled case trains (the pipeline's epochs repeat; nothing is evaluated).
    config.data.test_centers = ()
    config.data.val_fraction = 0.0
    for key, value in VARIANTS[variant].config if variant else ():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def model_spec(config) -> dict:
    """The plain description the PyTorch reference is built from (no JAX in that process)."""
    import inspect

    from her2jax import labels
    from her2jax.models import vit3d

    recipe = config.data.recipe
    spec = {"encoder": config.model.encoder, "in_channels": len(recipe.channels),
            "input_shape": [int(s) for s in recipe.shape],
            "num_classes": len(labels.CLASS_NAMES[config.data.scheme])}
    if config.model.encoder == "vit3d":
        size = vit3d.VIT_SIZES[config.model.vit.size]
        mlp_ratio = inspect.signature(vit3d.ViT3D.__init__).parameters["mlp_ratio"].default
        spec.update(patch_size=config.model.vit.patch_size, mlp_ratio=mlp_ratio, **size)
        spec["name"] = f"ViT-{config.model.vit.size}/{config.model.vit.patch_size} (FM-BCMRI)"
    else:
        r = config.model.resnet
        spec.update(depth=r.depth, shortcut=r.shortcut, bias_downsample=r.bias_downsample,
                    conv1_t_size=r.conv1_t_size, conv1_t_stride=r.conv1_t_stride,
                    widen_factor=r.widen_factor)
        widen = f" widen {r.widen_factor:g}" if r.widen_factor != 1.0 else ""
        spec["name"] = f"ResNet-{r.depth}{widen} (MedicalNet/MONAI)"
    t = config.train
    if t.optimizer != "adamw" or t.freeze != "none" or t.grad_accum != 1:
        raise ValueError("the PyTorch reference mirrors AdamW, nothing frozen, no accumulation")
    spec["train"] = {k: t[k] for k in ("learning_rate", "b1", "b2", "weight_decay",
                                        "layer_decay", "warmup_steps", "steps", "grad_clip",
                                        "label_smoothing")}
    spec["train"]["augment"] = t.augment.to_dict()
    if "pretrain" in config:
        spec["pretrain"] = config.pretrain.to_dict()
    return spec


def resolve_dtype(flag: str, accelerator: bool) -> str:
    if flag == "auto":
        return "bfloat16" if accelerator else "float32"
    return flag


def host_initialised_model(config, *, bn_axis_name: str | None = None, pretrain: bool = False):
    """``factory.build_model(config)`` (with ``pretrain``: MoCo v3's query network,
    ``pretrain.build_query``) with its parameters drawn on the host.

    The module comes from the builder under ``nnx.eval_shape``; kernels are then filled
    with N(0, 1 / fan_in), biases and BatchNorm means with 0, scales and variances with 1, the
    CLS token with 1e-6 N(0, 1) and the ViT's fixed position embedding with its sin-cos table.
    Eager random initialisation compiles one XLA program per parameter shape (14 s for the
    smoke ResNet on the 2-core CI machine); the values do not change what a step costs.
    """
    import jax
    from flax import nnx

    from her2jax.models import factory, vit3d
    from her2jax.train import pretrain as pretrain_lib

    build = pretrain_lib.build_query if pretrain else factory.build_model
    model = nnx.eval_shape(lambda: build(config, bn_axis_name=bn_axis_name))
    rng = np.random.default_rng(config.model.seed)

    def name_of(path) -> str:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        keys = [k for k in keys if k != "value"]
        return str(keys[-1])

    def fill(path, leaf):
        name = name_of(path)
        shape, dtype = leaf.shape, leaf.dtype
        if name in ("scale", "var"):
            return np.ones(shape, dtype)
        if name in ("bias", "mean"):
            return np.zeros(shape, dtype)
        if name == "pos_embed":
            encoder = model.encoder
            return vit3d.sincos_pos_embed_3d(encoder.grid, encoder.embed_dim)[None].astype(dtype)
        if name == "cls_token":
            return (1e-6 * rng.standard_normal(shape)).astype(dtype)
        if name != "kernel":
            raise ValueError(f"no host initialiser for the model variable {name!r}")
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model)))
    return model


def synthetic_batch(batch: int, shape, num_classes: int) -> dict[str, np.ndarray]:
    """One host batch like the pipeline's: image [B, D, H, W, C] float16, label, index, valid."""
    rng = np.random.default_rng(0)
    return {"image": rng.standard_normal((batch, *shape)).astype(np.float16),
            "label": (np.arange(batch) % num_classes).astype(np.int32),
            "index": np.arange(batch, dtype=np.int32),
            "valid": np.ones(batch, bool)}


def _versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _timed_windows(run_steps, block, *, warmup: int, steps: int, repeat: int):
    """(warmup seconds, [seconds per step of each window]).

    ``run_steps(n)`` enqueues n steps without waiting; ``block()`` waits for the device.
    """
    t0 = time.perf_counter()
    run_steps(warmup)
    block()
    warmup_s = time.perf_counter() - t0
    windows = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run_steps(steps)
        block()
        windows.append((time.perf_counter() - t0) / steps)
    return warmup_s, windows


# ----------------------------------------------------------------------------------------------
# Children: one measurement each


def child_her2jax(spec: dict) -> dict:
    """The her2jax step (train or features) on synthetic or pipeline input."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from her2jax import labels
    from her2jax.data import pipeline
    from her2jax.train import loop
    from her2jax.train import state as state_lib
    from her2jax.train import step as step_lib

    accelerator = jax.default_backend() != "cpu"
    dtype = resolve_dtype(spec["dtype"], accelerator)
    config = make_config(spec["config"], accelerator=accelerator, dtype=dtype,
                         batch=spec["batch"], variant=spec.get("variant"))
    if spec["workers"] >= 0:
        config.data.worker_count = spec["workers"]
    if not spec["augment"]:
        config.train.augment = dict(flips=False, scale=0.0, shift=0.0, noise=0.0)
    bench = BENCHES[spec["config"]]
    batch_size = spec["batch"]
    mesh = step_lib.make_mesh()
    n_devices = jax.device_count()
    if batch_size % n_devices:
        raise SystemExit(f"global batch {batch_size} is not divisible by the {n_devices} "
                         "devices")
    class_names = labels.CLASS_NAMES[config.data.scheme]
    image_shape = [*config.data.recipe.shape, len(config.data.recipe.channels)]

    model = host_initialised_model(config, bn_axis_name=step_lib.AXIS,
                                   pretrain=bench.mode == "pretrain")
    replicated = NamedSharding(mesh, P())
    result = {}
    if bench.mode == "pretrain":
        # The engine's MoCo v3 setup (her2jax.train.pretrain.run without the data loop).
        from flax import nnx

        from her2jax.train import pretrain

        total, p = config.train.steps, config.pretrain
        optimizer = pretrain.make_optimizer(config, nnx.state(model, nnx.Param),
                                            total_steps=total)
        graphdef, state = pretrain.create_state(model, optimizer, config.train.seed)
        train_step = pretrain.make_pretrain_step(
            graphdef, optimizer, mesh,
            views=pretrain.Views.from_config(p, config.data.recipe.channels),
            temperature=float(p.temperature), base_momentum=float(p.momentum),
            total_steps=total)
        device_batch = pipeline.to_global(synthetic_batch(batch_size, image_shape,
                                                          len(class_names)), mesh)
        carry = {"state": jax.device_put(state, replicated), "metrics": None}
        if spec.get("hlo_dir"):
            train_step = train_step.lower(carry["state"], device_batch).compile()
            _write_hlo(spec, train_step.as_text())

        def run_steps(n):
            for _ in range(n):
                carry["state"], carry["metrics"] = train_step(carry["state"], device_batch)

        def block():
            jax.block_until_ready((carry["state"], carry["metrics"]))
    elif bench.mode == "features":
        graphdef, params, rest = state_lib.split_model(model)
        params, rest = jax.device_put((params, rest), replicated)
        predict = step_lib.make_predict(graphdef)
        image = pipeline.to_global(synthetic_batch(batch_size, image_shape,
                                                   len(class_names)), mesh)["image"]
        outputs = []

        def run_steps(n):
            for _ in range(n):
                outputs[:] = [predict(params, rest, image)]

        def block():
            jax.block_until_ready(outputs)
    else:
        if spec["input"] == "pipeline":
            dataset = pipeline.open_dataset(spec["data_dir"], config.data)
            split = pipeline.select_splits(dataset, config.data)["train"]
            total = (spec["warmup"] + spec["steps"] * spec["repeat"]
                     + (PROFILE_STEPS if spec.get("profile_dir") else 0))
            host_batches = pipeline.train_batches(
                dataset, split, global_batch_size=batch_size, seed=config.train.seed,
                start_step=0, stop_step=total, process_index=jax.process_index(),
                process_count=jax.process_count(), worker_count=config.data.worker_count,
                prefetch=config.data.prefetch)

            device_batches = pipeline.device_batches(host_batches, mesh,
                                                     ahead=config.data.device_prefetch)

            def next_batch():
                return next(device_batches)

            train_labels = split.labels
            result.update(workers=config.data.worker_count, train_examples=len(split))
        else:
            host = synthetic_batch(batch_size, image_shape, len(class_names))
            device_batch = pipeline.to_global(host, mesh)
            train_labels = host["label"]

            def next_batch():
                return device_batch

        # The engine's own training setup (her2jax.train.loop.build_training).
        training = loop.build_training(config, mesh, train_labels, model=model)
        state, train_step = training.state, training.train_step
        if spec.get("hlo_dir"):
            # The optimised HLO of the step as it runs (the compiled executable is used below,
            # so nothing is compiled twice).
            first = next_batch()
            train_step = train_step.lower(state, first).compile()
            _write_hlo(spec, train_step.as_text())
            pending = [first]
            feed = next_batch

            def next_batch():
                return pending.pop() if pending else feed()
        carry = {"state": state, "metrics": None}

        def run_steps(n):
            for _ in range(n):
                carry["state"], carry["metrics"] = train_step(carry["state"], next_batch())

        def block():
            jax.block_until_ready((carry["state"], carry["metrics"]))

    warmup_s, windows = _timed_windows(run_steps, block, warmup=spec["warmup"],
                                       steps=spec["steps"], repeat=spec["repeat"])
    if spec.get("profile_dir"):
        # After the timing, so the trace never costs a timed step: a few steps' device
        # activity as a Perfetto trace (benchmarks/trace_summary.py reads it).
        where = Path(spec["profile_dir"]) / _file_name(spec)
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # Python frames would be most of the trace's size
        jax.profiler.start_trace(str(where), create_perfetto_trace=True,
                                 profiler_options=options)
        run_steps(PROFILE_STEPS)
        block()
        jax.profiler.stop_trace()
        result["profile"] = str(where)
    if bench.mode in ("train", "pretrain"):
        result["final_loss"] = float(jax.device_get(carry["metrics"]["loss"]))
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    kind = device.device_kind if device.platform != "cpu" else _cpu_name()
    packages = ["jax", "jaxlib", "flax", "optax", "numpy"]
    if spec["input"] == "pipeline":
        packages += ["grain", "array-record"]
    versions = _versions(*packages)
    try:
        versions["backend"] = device.client.platform_version
    except AttributeError:
        pass
    result.update(
        dtype=dtype, input_shape=image_shape, warmup_s=warmup_s, windows=windows,
        peak_memory_bytes=(stats or {}).get("peak_bytes_in_use"),
        device=f"{device.platform}: {kind}", device_kind=kind, device_count=n_devices,
        versions=versions,
        attention=(config.model.vit.attention if bench.encoder == "vit3d" else None),
        attention_pad=(config.model.vit.attention_pad if bench.encoder == "vit3d" else None))
    return result


def _file_name(spec: dict) -> str:
    """A file-name-safe name of a child's measurement."""
    parts = [spec["config"], f"b{spec['batch']}", spec["input"], spec.get("variant") or "base"]
    return "-".join(parts)


def _write_hlo(spec: dict, text: str) -> None:
    import gzip

    where = Path(spec["hlo_dir"])
    where.mkdir(parents=True, exist_ok=True)
    with gzip.open(where / f"{_file_name(spec)}.hlo.txt.gz", "wt") as f:
        f.write(text)


def child_torch(spec: dict, compiled: bool) -> dict:
    """The PyTorch reference step (train or features) on a synthetic device batch."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch_reference as ref

    model_info = spec["model"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = resolve_dtype(spec["dtype"], cuda)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    bench = BENCHES[spec["config"]]
    torch.manual_seed(0)
    vit = model_info["encoder"] == "vit3d"
    if vit:
        model = ref.ViT3D(in_channels=model_info["in_channels"],
                          input_shape=model_info["input_shape"],
                          patch_size=model_info["patch_size"],
                          embed_dim=model_info["embed_dim"], depth=model_info["depth"],
                          num_heads=model_info["num_heads"], mlp_ratio=model_info["mlp_ratio"],
                          num_classes=model_info["num_classes"])
        memory_format = torch.contiguous_format
    else:
        model = ref.resnet(depth=model_info["depth"], in_channels=model_info["in_channels"],
                           shortcut=model_info["shortcut"],
                           bias_downsample=model_info["bias_downsample"],
                           conv1_t_size=model_info["conv1_t_size"],
                           conv1_t_stride=model_info["conv1_t_stride"],
                           widen_factor=model_info["widen_factor"],
                           num_classes=model_info["num_classes"])
        memory_format = torch.channels_last_3d
        if cuda:
            torch.backends.cudnn.benchmark = True
    model = model.to(device=device, memory_format=memory_format)
    image_shape = [*model_info["input_shape"], model_info["in_channels"]]
    host = synthetic_batch(spec["batch"], image_shape, model_info["num_classes"])
    # [B, D, H, W, C] -> [B, C, D, H, W]: already channels_last_3d in memory.
    image = torch.from_numpy(host["image"]).permute(0, 4, 1, 2, 3).to(device)
    image = image.contiguous(memory_format=memory_format)
    label = torch.from_numpy(host["label"]).long().to(device)
    result = {}
    if bench.mode == "pretrain":
        train, views = spec["model"]["train"], spec["model"]["pretrain"]
        moco = ref.MoCoV3(model, features=model_info["embed_dim"], dim=views["dim"],
                          mlp_dim=views["mlp_dim"],
                          freeze_patch_embed=views["freeze_patch_embed"]).to(device).train()
        try:
            optimizer, scheduler = ref.make_pretrain_optimizer(moco, train, fused=True)
            result["torch_optimizer"] = "AdamW(fused=True)"
        except (RuntimeError, ValueError) as error:
            optimizer, scheduler = ref.make_pretrain_optimizer(moco, train, fused=False)
            result["torch_optimizer"] = f"AdamW(foreach=True): fused unsupported here ({error})"
        step = ref.PretrainStep(
            moco, optimizer, scheduler, views=views, temperature=views["temperature"],
            base_momentum=views["momentum"], total_steps=int(train["steps"]),
            autocast_dtype=autocast, grad_clip=train["grad_clip"],
            query=torch.compile(moco.query) if compiled else None)
        losses = []

        def run_steps(n):
            for _ in range(n):
                losses[:] = [step(image)]
    elif bench.mode == "features":
        model.eval()
        features = torch.compile(model.features) if compiled else model.features
        step = ref.FeatureStep(features, model.head, autocast_dtype=autocast)
        outputs = []

        def run_steps(n):
            for _ in range(n):
                outputs[:] = [step(image)]
    else:
        model.train()
        train = spec["model"]["train"]
        vit_depth = model_info["depth"] if vit else None
        try:
            optimizer, scheduler = ref.make_optimizer(model, train, vit_depth=vit_depth,
                                                      fused=True)
            result["torch_optimizer"] = "AdamW(fused=True)"
        except (RuntimeError, ValueError) as error:
            optimizer, scheduler = ref.make_optimizer(model, train, vit_depth=vit_depth,
                                                      fused=False)
            result["torch_optimizer"] = f"AdamW(foreach=True): fused unsupported here ({error})"
        counts = np.bincount(host["label"], minlength=model_info["num_classes"])
        # 'balanced' weights n / (K n_c), as her2jax.train.loop.class_weights.
        weights = np.where(counts > 0, len(host["label"])
                           / (len(counts) * np.maximum(counts, 1)), 0.0)
        weights = torch.tensor(weights, dtype=torch.float32, device=device)
        step = ref.TrainStep(torch.compile(model) if compiled else model, optimizer, scheduler,
                             model.parameters(), augment_config=train["augment"]
                             if spec["augment"] else {}, grad_clip=train["grad_clip"],
                             class_weights=weights, autocast_dtype=autocast,
                             label_smoothing=train["label_smoothing"])
        losses = []

        def run_steps(n):
            for _ in range(n):
                losses[:] = [step(image, label)]

    def block():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warmup_s, windows = _timed_windows(run_steps, block, warmup=spec["warmup"],
                                       steps=spec["steps"], repeat=spec["repeat"])
    if bench.mode in ("train", "pretrain"):
        result["final_loss"] = float(losses[0])
    versions = _versions("torch", "numpy", *([] if vit else ["monai"]))
    if cuda:
        versions["cuda"] = torch.version.cuda
        versions["cudnn"] = str(torch.backends.cudnn.version())
        kind = torch.cuda.get_device_name(0)
    else:
        kind = _cpu_name()
    result.update(
        dtype=dtype, input_shape=image_shape, warmup_s=warmup_s, windows=windows,
        peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        device=f"{device.type}: {kind}", device_kind=kind, device_count=1, versions=versions,
        autocast="bfloat16" if autocast else None, torch_threads=torch.get_num_threads())
    return result


def forward_flops(names) -> dict[str, float]:
    """{config: forward FLOPs per volume} from XLA's cost analysis (see the module docstring).

    Runs in the parent on JAX's CPU backend only (no device memory is touched there), from
    the model's shapes: no parameter is materialised.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from her2jax.models import factory

    jax.config.update("jax_platforms", "cpu")
    out = {}
    for name in names:
        config = make_config(name, accelerator=False, dtype="float32")
        model = nnx.eval_shape(lambda config=config: factory.build_model(config))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def forward(params, rest, x, graphdef=graphdef):
            model = nnx.merge(graphdef, params, rest, copy=True)
            model.eval()
            return model(x)

        shape = (1, *config.data.recipe.shape, len(config.data.recipe.channels))
        compiled = jax.jit(forward).lower(params, rest,
                                          jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
        analysis = compiled.cost_analysis()
        if isinstance(analysis, list | tuple):
            analysis = analysis[0]
        out[name] = float(analysis["flops"])
    return out


def run_child(spec: dict) -> None:
    role = spec["role"]
    if role == "her2jax":
        result = child_her2jax(spec)
    else:
        result = child_torch(spec, compiled=role == "pytorch-compile")
    Path(spec["out"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Parent


@dataclasses.dataclass
class Measurement:
    config: str
    framework: str
    input: str = "synthetic"

    batch: int | None = None   # --batch, overriding the configuration's
    variant: str | None = None  # a key of VARIANTS (her2jax only)

    @property
    def name(self) -> str:
        batch = f"@b{self.batch}" if self.batch else ""
        variant = f"+{self.variant}" if self.variant else ""
        suffix = "/pipeline" if self.input == "pipeline" else ""
        return f"{self.config}{batch}/{self.framework}{variant}{suffix}"


def _spawn(spec: dict, *, env: dict, timeout: float) -> tuple[dict | None, str]:
    """Runs one child; (its result or None, the tail of its output when it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spec = {**spec, "out": str(out)}
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                                   json.dumps(spec)], env=env, capture_output=True, text=True,
                                  timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired as error:
            tail = (error.stderr or b"")
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return None, f"timed out after {timeout:.0f} s; " + tail[-2000:]
        if proc.returncode != 0 or not out.exists():
            return None, f"exit {proc.returncode}: " + (proc.stderr or proc.stdout)[-2000:]
        return json.loads(out.read_text()), ""


def prepare_datasets(configs, *, root: Path, patients: int, smoke: bool,
                     batch: int | None) -> dict[str, dict]:
    """One phantom cohort + prepared dataset per recipe, shared by the configs that use it.

    Returns:
      {config: {data_dir, prepare_s, cohort_patients, cases}}.
    """
    from her2jax.data import phantom, prepare
    from her2jax.data.recipes import plain

    groups: dict[str, list[str]] = {}
    for name in configs:
        config = make_config(name, accelerator=False, dtype="float32")
        groups.setdefault(json.dumps(plain(config.data.recipe), sort_keys=True), []).append(name)
    out = {}
    for i, names in enumerate(groups.values()):
        # Enough labelled cases for the largest global batch (~5 % of phantom cases have none).
        n = max(patients, *(math.ceil((batch or BENCHES[name].batch) * 1.25)
                            for name in names))
        config = make_config(names[0], accelerator=False, dtype="float32")
        t0 = time.perf_counter()
        where = root / f"data{i}"
        cohort = phantom.write_cohort(where / "cohort", patients=n, centers=3, seed=0,
                                      shape=(48, 48, 24) if smoke else (64, 64, 32), phases=4)
        prepared = prepare.prepare(cohort, where / "data", config.data,
                                   workers=1 if smoke else 0, progress=False)
        made = {"data_dir": str(where / "data"), "prepare_s": time.perf_counter() - t0,
                "cohort_patients": n, "cases": prepared.num_cases}
        print(f"[bench_train] prepared {prepared.num_cases} cases for {', '.join(names)} in "
              f"{made['prepare_s']:.1f} s", file=sys.stderr, flush=True)
        out.update({name: made for name in names})
    return out


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def finish(line: dict, flops: float | None, peak_flag: float | None) -> dict:
    """Adds the figures derived from step time and FLOPs (see the module docstring)."""
    windows = line.pop("windows")
    step_s = statistics.median(windows)
    line["step_ms"] = _round(step_s * 1e3)
    line["step_ms_windows"] = [_round(w * 1e3) for w in windows]
    line["volumes_per_s"] = _round(line["batch"] / step_s)
    line["warmup_s"] = _round(line["warmup_s"], 4)
    if flops is None:
        line.update(flops_per_step=None, tflops_per_s=None, mfu=None, peak_tflops=None)
        return line
    multiplier = {"train": 3, "features": 1, "pretrain": 8}[line["mode"]]
    line["flops_per_step"] = multiplier * flops * line["batch"]
    line["flops_convention"] = FLOP_CONVENTION
    tflops = line["flops_per_step"] / step_s / 1e12
    line["tflops_per_s"] = _round(tflops)
    peak = peak_flag
    if peak is None and line["dtype"] == "bfloat16":
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in line["device_kind"]), None)
    line["peak_tflops"] = peak
    line["mfu"] = _round(tflops / (peak * line["device_count"])) if peak else None
    return line


def add_ratios(lines: list[dict]) -> None:
    """her2jax / PyTorch volumes/s per config, pipeline / synthetic for her2jax, and each
    variant over the unchanged step with the same input."""
    def rate(config, framework, input_="synthetic", variant=None):
        for line in lines:
            if (line["config"], line["framework"], line["input"],
                    line.get("variant")) == (config, framework, input_, variant):
                return line.get("volumes_per_s")
        return None

    for line in lines:
        if line["framework"] != "her2jax" or "volumes_per_s" not in line:
            continue
        variant = line.get("variant")
        for framework, key in (("pytorch", "ratio_vs_pytorch"),
                               ("pytorch-compile", "ratio_vs_pytorch_compile")):
            theirs = rate(line["config"], framework)
            if theirs:
                line[key] = _round(line["volumes_per_s"] / theirs, 4)
        if line["input"] == "pipeline":
            # A pipeline-only variant (no_device_prefetch) is compared with the plain step.
            synthetic = (rate(line["config"], "her2jax", variant=variant)
                         or rate(line["config"], "her2jax"))
            if synthetic:
                line["e2e_over_synthetic"] = _round(line["volumes_per_s"] / synthetic, 4)
        if variant:
            base = rate(line["config"], "her2jax", line["input"])
            if base:
                line["ratio_vs_base"] = _round(line["volumes_per_s"] / base, 4)


def summary_table(lines: list[dict]) -> str:
    width = max([44, *(len(line["name"]) for line in lines)])
    header = (f"{'measurement':<{width}} {'vol/s':>9} {'step ms':>9} {'TFLOP/s':>9} {'MFU':>6} "
              f"{'peak MiB':>9} {'vs torch':>8} {'e2e/syn':>7} {'vs base':>7}")
    rows = [header, "-" * len(header)]

    def fmt(value, spec):
        if isinstance(value, int | float):
            return format(value, spec)
        return format("-", ">" + spec.split(".")[0])

    for line in lines:
        if "volumes_per_s" not in line:
            status = line.get("skipped") and "skipped" or "FAILED"
            rows.append(f"{line['name']:<{width}} {status}")
            continue
        memory = line.get("peak_memory_bytes")
        rows.append(
            f"{line['name']:<{width}} {fmt(line['volumes_per_s'], '9.1f')} "
            f"{fmt(line['step_ms'], '9.2f')} {fmt(line.get('tflops_per_s'), '9.3f')} "
            f"{fmt(line.get('mfu'), '6.3f')} "
            f"{fmt(memory / 2 ** 20 if memory else None, '9.0f')} "
            f"{fmt(line.get('ratio_vs_pytorch'), '8.3f')} "
            f"{fmt(line.get('e2e_over_synthetic'), '7.3f')} "
            f"{fmt(line.get('ratio_vs_base'), '7.3f')}")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="",
                        help="comma-separated names (default: all, or the smoke ones)")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--input", choices=("synthetic", "pipeline"), default="synthetic")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="compute dtype; auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--warmup", type=int, default=None, help="default 5 (smoke 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per timed window; default 20 (smoke 3)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed windows; step_ms is their median; default 3 (smoke 1)")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch for every selected config (names get @b<N>)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="per-device peak for MFU (default 989 on H100/H200 in bfloat16)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="pytorch-compile: auto skips it in --smoke on a CPU")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="on-device augmentation in both frameworks' steps")
    parser.add_argument("--workers", type=int, default=-1,
                        help="grain workers for --input=pipeline (-1: 0 on <= 4 cores, else "
                             "min(8, cores / 2))")
    parser.add_argument("--patients", type=int, default=None,
                        help="phantom cohort size for --input=pipeline (default 64, smoke 16; "
                             "at least 1.25 x the batch)")
    parser.add_argument("--variants", default="",
                        help="comma-separated her2jax step variants measured beside the "
                             "unchanged step (A/B): " + ", ".join(VARIANTS))
    parser.add_argument("--jsonl", default=None,
                        help="also append each measurement to this file as soon as it ends "
                             "(rewritten with the ratios at the end)")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="wall-clock budget: measurements that cannot start with 30 s "
                             "left are skipped, and each child's timeout is what is left")
    parser.add_argument("--profile_dir", default=None,
                        help="trace a few her2jax steps of every measurement (after timing) "
                             "into this folder as Perfetto traces")
    parser.add_argument("--hlo_dir", default=None,
                        help="write each her2jax training step's optimised HLO here (gzip)")
    parser.add_argument("--child_timeout", type=float, default=1800.0)
    parser.add_argument("--smoke", action="store_true",
                        help="CI size: the smoke_* configs, 2 warm-up + 3 timed steps")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.warmup = args.warmup if args.warmup is not None else (2 if smoke else 5)
    args.steps = args.steps if args.steps is not None else (3 if smoke else 20)
    args.repeat = args.repeat if args.repeat is not None else (1 if smoke else 3)
    args.patients = args.patients if args.patients is not None else (16 if smoke else 64)
    if args.workers < 0:
        cores = os.cpu_count() or 1
        args.workers = 0 if cores <= 4 else min(8, cores // 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        run_child(json.loads(args.child))
        return 0
    names = [n for n in args.configs.split(",") if n] or list(
        SMOKE_CONFIGS if args.smoke else DEFAULT_CONFIGS)
    frameworks = [f for f in args.frameworks.split(",") if f]
    variants = [v for v in args.variants.split(",") if v]
    unknown = (sorted(set(names) - set(BENCHES)) + sorted(set(frameworks) - set(FRAMEWORKS))
               + sorted(set(variants) - set(VARIANTS)))
    if unknown or min(args.warmup, args.steps - 1, args.repeat - 1) < 0:
        print(f"bench_train: unknown config / framework / variant {', '.join(unknown)} "
              f"(known: {', '.join(BENCHES)}; {', '.join(FRAMEWORKS)}; {', '.join(VARIANTS)}), "
              "or --steps / --repeat < 1", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s if args.budget_s else None

    plan = []
    for name in names:
        bench = BENCHES[name]
        inputs = ["synthetic"] + (["pipeline"] if args.input == "pipeline"
                                  and bench.mode == "train" else [])
        for framework in frameworks:
            for input_ in inputs if framework == "her2jax" else ["synthetic"]:
                plan.append(Measurement(name, framework, input_, batch=args.batch))
        if "her2jax" in frameworks and bench.mode == "train":
            for variant in variants:
                for input_ in inputs:
                    if (bench.encoder in VARIANTS[variant].encoders
                            and input_ in VARIANTS[variant].inputs):
                        plan.append(Measurement(name, "her2jax", input_, batch=args.batch,
                                                variant=variant))
    common = {"dtype": args.dtype, "warmup": args.warmup, "steps": args.steps,
              "repeat": args.repeat, "augment": args.augment, "workers": args.workers,
              "profile_dir": args.profile_dir, "hlo_dir": args.hlo_dir}
    env = dict(os.environ)
    if args.jsonl:
        Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)

    def emit(line: dict) -> None:
        lines.append(line)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(line) + "\n")
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        data = prepare_datasets(sorted({m.config for m in plan if m.input == "pipeline"}),
                                root=Path(tmp), patients=args.patients,
                                smoke=args.smoke, batch=args.batch)
        flops = forward_flops(names)
        lines, failed, torch_devices = [], False, {}
        for m in plan:
            bench = BENCHES[m.config]
            config = make_config(m.config, accelerator=False, dtype="float32")
            spec = model_spec(config)
            line = {"name": m.name, "config": m.config, "framework": m.framework,
                    "mode": bench.mode, "input": m.input, "model": spec["name"],
                    "batch": m.batch or bench.batch, "variant": m.variant,
                    "reference": REFERENCE}
            if m.variant:
                line["variant_what"] = VARIANTS[m.variant].what
            left = deadline - time.monotonic() if deadline else None
            if (m.framework == "pytorch-compile" and args.compile == "off") or (
                    m.framework == "pytorch-compile" and args.compile == "auto" and args.smoke
                    and torch_devices.get(m.config, "").startswith("cpu")):
                line["skipped"] = ("torch.compile off" if args.compile == "off" else
                                   "--smoke on a CPU: torch.compile of one tiny model took "
                                   "~40 s on the 2-core CI machine (--compile=on runs it)")
            elif left is not None and left < 30:
                line["skipped"] = f"--budget_s: {max(left, 0):.0f} s left"
            if "skipped" in line:
                line["date"] = _now()
                emit(line)
                continue
            print(f"[bench_train] {m.name} ...", file=sys.stderr, flush=True)
            child = {**common, "role": m.framework, "config": m.config, "input": m.input,
                     "batch": line["batch"], "variant": m.variant,
                     "model": spec, "data_dir": data.get(m.config, {}).get("data_dir")}
            child_env = env
            if m.variant and VARIANTS[m.variant].xla_flags:
                child_env = {**env, "XLA_FLAGS": " ".join(filter(None, (
                    env.get("XLA_FLAGS", ""), VARIANTS[m.variant].xla_flags)))}
            t0 = time.perf_counter()
            result, error = _spawn(child, env=child_env,
                                   timeout=min(args.child_timeout, left or math.inf))
            child_s = time.perf_counter() - t0
            if result is None:
                failed = True
                line["error"] = error
                line["date"] = _now()
                print(f"[bench_train] {m.name} FAILED: {error}", file=sys.stderr)
                emit(line)
                continue
            if m.framework == "pytorch":
                torch_devices[m.config] = result["device"]
            line.update(result)
            if m.input == "pipeline":
                line["prepare_s"] = _round(data[m.config]["prepare_s"], 4)
                line["cohort_patients"] = data[m.config]["cohort_patients"]
            line["date"] = _now()
            emit(finish(line, flops.get(m.config), args.peak_tflops))
            print(f"[bench_train] {m.name}: {line['volumes_per_s']} volumes/s "
                  f"(process {child_s:.1f} s)", file=sys.stderr, flush=True)
    add_ratios(lines)
    if args.jsonl:
        # The whole file again, now with the ratios (atomically: a reader never sees less).
        tmp = Path(args.jsonl).with_suffix(".tmp")
        previous = Path(args.jsonl).read_text().splitlines() if Path(args.jsonl).exists() else []
        mine = len(lines)
        kept = previous[:len(previous) - mine]  # lines of earlier runs appended to the file
        tmp.write_text("".join(x + "\n" for x in kept)
                       + "".join(json.dumps(line) + "\n" for line in lines))
        os.replace(tmp, args.jsonl)
    for line in lines:
        print(json.dumps(line), flush=True)
    print(summary_table(lines), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
