"""her2jax-port: a PyTorch foundation-encoder checkpoint -> Flax encoder state (orbax).

  her2jax-port --source=NAME --checkpoint=PATH --out=DIR [--in_channels=C]

Sources (``her2jax.models.port.SOURCES_BY_NAME``): fmbcmri, breastmrfm, medicalnet, fmcib, and
the generic monai-resnet / timm-vit3d, which need the architecture facts as flags.

Training loads the result with ``--config.model.pretrained=DIR``. torch is never imported
and nothing in the checkpoint outside an allow-list of tensor types is ever unpickled.
"""

from __future__ import annotations

from absl import flags

from her2jax import cli
from her2jax.errors import Her2jaxError
from her2jax.models import port

_SOURCE = flags.DEFINE_enum(
    "source", None, list(port.SOURCES),
    "; ".join(f"{s.name}: {s.title}" for s in port.SOURCES_BY_NAME.values()) + ".")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  ".pth / .pth.tar / .pt (zip or legacy) or .safetensors file.")
_OUT = flags.DEFINE_string("out", None, "Output directory (encoder/ + port.json).")
_IN_CHANNELS = flags.DEFINE_integer(
    "in_channels", 0, "Input channels of the model (the recipe's channel count); a "
    "single-channel first layer is inflated. 0: as in the checkpoint.", lower_bound=0)
_NUM_HEADS = flags.DEFINE_integer(
    "num_heads", None, "ViT attention heads (not in the weights; fmbcmri knows its own, "
    "timm-vit3d needs this flag).", lower_bound=1)
_CONV1_T_STRIDE = flags.DEFINE_integer(
    "conv1_t_stride", None, "ResNet first-convolution stride (not in the weights; the named "
    "ResNet sources know theirs, monai-resnet needs this flag).", lower_bound=1)
_DILATED = flags.DEFINE_bool(
    "dilated", None, "ResNet layers 3-4 at stride 1 dilated 2 / 4, as Tencent's MedicalNet "
    "(source medicalnet: yes; the others: no). Give it to override the source.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing port in --out.")


def _main(argv: list[str]) -> None:
    del argv
    for flag in (_SOURCE, _CHECKPOINT, _OUT):
        if not flag.value:
            raise Her2jaxError(f"--{flag.name} is required")
    report = port.port(_SOURCE.value, _CHECKPOINT.value, _OUT.value,
                       in_channels=_IN_CHANNELS.value or None,
                       num_heads=_NUM_HEADS.value, conv1_t_stride=_CONV1_T_STRIDE.value,
                       dilated=_DILATED.value, overwrite=_OVERWRITE.value)
    print(report.summary())
    print(f"wrote {_OUT.value}")


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
