#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that the lent GPU machine's image lacks, for its
# Python 3.12 on x86-64, so that benchmarks/gpu_session.sh can install them there offline:
#
#   bash benchmarks/device_wheels.sh            # here, once per session (needs PyPI)
#   device run, carry [".whl"]: bash benchmarks/gpu_session.sh
#
# The image already holds jax 0.11.2 (CUDA), numpy, scipy, scikit-learn, matplotlib, pandas,
# absl-py, protobuf, etils, tensorstore, torch and timm. It lacks the data stack (grain,
# array-record, tensorflow-datasets and what TFDS imports), nibabel, ml-collections,
# tensorboardX and MONAI (the ResNet reference). flax, optax and orbax-checkpoint are on the
# image in versions nobody here has read, so the versions this project is tested with travel
# too (a carried wheel comes first on PYTHONPATH). Every wheel is pinned and fetched without
# its dependencies: the list is the whole closure over what the image lacks, checked by
# importing her2jax and running `bench_train.py --smoke` in a Python 3.12 virtualenv holding
# only the image's packages (BENCHMARKS.md, "Device plan").
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  grain==0.2.18
  array-record==0.8.6
  tensorflow-datasets==4.9.10
  dm-tree==0.1.10
  simple-parsing==0.1.9
  docstring-parser==0.18.0
  tensorflow-metadata==1.21.0
  googleapis-common-protos==1.76.0
  immutabledict==4.3.1
  termcolor==3.3.0
  toml==0.10.2
  portpicker==1.6.0
  nibabel==5.4.2
  importlib-resources==7.1.0
  ml-collections==1.1.0
  tensorboardX==2.6.5
  monai==1.6.1
  flax==0.12.12
  optax==0.2.8
  orbax-checkpoint==0.12.8
)

PLATFORMS=()
for tag in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 \
           manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
           manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux1_x86_64 any; do
  PLATFORMS+=(--platform "$tag")
done

mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"

# promise (imported by TFDS's download module) is published as an sdist only: build its
# pure-Python wheel here.
SDIST_ONLY=(promise==2.3)
python3 -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "${SDIST_ONLY[@]}"

# One version of each: two wheels of one project stop the whole install on the device.
dupes=$(find .whl -maxdepth 1 -name '*.whl' -printf '%f\n' | cut -d- -f1 | tr 'A-Z-' 'a-z_' \
  | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "device_wheels: several versions in .whl/ of: $dupes (remove the old ones)" >&2
  exit 2
fi
du -ch .whl/*.whl | tail -1
