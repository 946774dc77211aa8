"""The TFDS dataset ``her2_dce_mri``: preprocessed crops as ArrayRecord, one split per centre.

Building and reading need no TensorFlow: examples are encoded by TFDS's numpy codecs and
volumes are stored as raw float16 bytes (``Encoding.BYTES``), which builds ~10x faster than
the default encoding and decodes with a single ``np.frombuffer``.

TFDS reuses an existing dataset of the same name, config and version without looking at
its contents, so the builder config's name carries a hash of the cohort listing and the
recipe: a different cohort or recipe can never be served from a stale directory.

On disk (``data_dir/her2_dce_mri/<recipe>_<hash>/1.0.0/``): the TFDS files, plus
``her2jax.json`` (recipe, hashes, splits and counts), ``index.csv`` (one row per example:
split, position, patient and raw label fields), ``kinetic_features.csv`` (the hand-made
baseline's features, :mod:`her2jax.data.kinetic_features`; absent in datasets prepared before
it existed, which stay valid), ``excluded.csv``, ``rejected.csv`` and ``qc_montage.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from array_record.python import array_record_module
from tensorflow_datasets.proto import tf_example_pb2

from her2jax.errors import Her2jaxError
from her2jax.jsonfile import read_json

DATASET_NAME = "her2_dce_mri"
FORMAT_VERSION = "1.0.0"  # the feature layout below; bump when it changes
META_FILE = "her2jax.json"
INDEX_FILE = "index.csv"
FILE_FORMAT = "array_record"


@dataclasses.dataclass(frozen=True)
class Example:
    """One preprocessed case as written to the dataset (the builder's input).

    Attributes:
      key: unique, sortable key (the patient id).
      split: the TFDS split (the sanitised centre name).
      load: returns the feature dict (image [D, H, W, C] float16, mask [D, H, W] uint8, ...);
        called once, while the split is written, so crops need not all sit in memory.
    """

    key: str
    split: str
    load: Callable[[], dict]


def split_name(center: str) -> str:
    """The TFDS split name of a centre: letters, digits and underscores only."""
    name = re.sub(r"\W+", "_", center.strip()).strip("_")
    if not name:
        raise Her2jaxError(f"centre name {center!r} has no letters or digits", key="center")
    return name


def features(shape: Sequence[int], num_channels: int) -> tfds.features.FeaturesDict:
    """The example layout.

    Args:
      shape: the crop grid (D, H, W).
      num_channels: C, the recipe's channel count.
    """
    raw = tfds.features.Encoding.BYTES
    d, h, w = (int(s) for s in shape)
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(d, h, w, num_channels), dtype=np.float16,
                                      encoding=raw),
        "mask": tfds.features.Tensor(shape=(d, h, w), dtype=np.uint8, encoding=raw),
        "patient_id": tfds.features.Text(),
        "center": tfds.features.Text(),
        # Raw label fields; the task label is derived from them when the dataset is read.
        "ihc": tfds.features.Text(),
        "ish": tfds.features.Text(),
        "her2": tfds.features.Scalar(dtype=np.int32),
        "clinical": tfds.features.Text(),       # JSON object of the carried clinical columns
        "recipe": tfds.features.Text(),         # JSON of the preprocessing recipe
        # Geometry to map results (e.g. SHAP maps) back onto the source image.
        "box": tfds.features.Tensor(shape=(3, 2), dtype=np.int32),
        "crop_affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
        "source_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32),
        "source_affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
    })


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo that never looks for a published copy on the ``gs://tfds-data`` bucket.

    TFDS calls ``initialize_from_bucket`` whenever a builder is made for a dataset not yet
    on disk (every prepare); that makes an empty ``/tmp/tmp*tfds`` folder it never removes,
    one per prepare. A her2jax dataset is never published there.
    """

    def initialize_from_bucket(self) -> None:
        pass


class Her2DceMri(tfds.core.GeneratorBasedBuilder):
    """Builds ``her2_dce_mri`` from already preprocessed examples (see :mod:`prepare`)."""

    VERSION = tfds.core.Version(FORMAT_VERSION)

    def __init__(self, *, config_name: str, description: str, shape: Sequence[int],
                 num_channels: int, examples: Sequence[Example], **kwargs):
        self._shape = tuple(shape)
        self._num_channels = num_channels
        self._examples = list(examples)
        config = tfds.core.BuilderConfig(name=config_name, description=description)
        super().__init__(config=config, file_format=FILE_FORMAT, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(
            builder=self,
            description="Breast DCE-MRI tumour crops with raw HER2 label fields (her2jax).",
            features=features(self._shape, self._num_channels),
            # Keep examples in key (patient id) order: deterministic and easy to audit.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        names = sorted({e.split for e in self._examples})
        return {name: self._generate_examples(name) for name in names}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        for example in sorted(self._examples, key=lambda e: e.key):
            if example.split == split:
                yield example.key, example.load()


def build(tmp_data_dir: Path, *, config_name: str, description: str, shape: Sequence[int],
          num_channels: int, examples: Sequence[Example]) -> Path:
    """Writes the dataset under ``tmp_data_dir`` and returns its version directory."""
    # TFDS logs every step, prints banners about "downloading" and draws its own progress
    # bars; prepare prints its own summary instead.
    tfds.disable_progress_bar()
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            version_dir = _build(tmp_data_dir, config_name=config_name, description=description,
                                 shape=shape, num_channels=num_channels, examples=examples)
    finally:
        logging.set_verbosity(verbosity)
    for shard in sorted(version_dir.glob(f"*.{FILE_FORMAT}-*-of-*")):
        _rewrite_uncompressed(shard)
    return version_dir


def _build(tmp_data_dir: Path, *, config_name, description, shape, num_channels,
           examples) -> Path:
    builder = Her2DceMri(data_dir=str(tmp_data_dir), config_name=config_name,
                         description=description, shape=shape, num_channels=num_channels,
                         examples=examples)
    builder.download_and_prepare(
        download_dir=str(tmp_data_dir / "downloads"),
        # Never look for a pre-built copy on the network: the data are local and private.
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return Path(builder.data_dir)


def _rewrite_uncompressed(shard: Path, chunk: int = 64) -> None:
    """Rewrites an ArrayRecord shard without compression and with every example's features
    in name order, in place (via a rename).

    TFDS writes ArrayRecord with the format's default compression; z-scored float16 crops
    barely compress (~8 %) but decompressing them costs more than the rest of the read
    path, 2-4x slower random access on one core (see BENCHMARKS.md). Readers take the
    options from the file itself, so nothing else changes.

    TFDS serializes each ``tf.train.Example`` with its feature map in the order of the
    protobuf runtime's hash table, which changes from one process to the next: the same
    cohort and recipe gave other bytes in another process (the same examples, so readers
    never noticed). Protobuf's deterministic serialization writes map entries sorted by key,
    so a dataset's bytes depend only on its cohort and recipe.
    """
    reader = array_record_module.ArrayRecordReader(str(shard), "readahead_buffer_size:0")
    tmp = shard.with_name(shard.name + ".uncompressed")
    writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1,uncompressed")
    try:
        count = reader.num_records()
        for start in range(0, count, chunk):
            for record in reader.read(list(range(start, min(start + chunk, count)))):
                example = tf_example_pb2.Example.FromString(record)
                writer.write(example.SerializeToString(deterministic=True))
    finally:
        writer.close()
        reader.close()
    tmp.replace(shard)


def find_datasets(data_dir: Path) -> list[Path]:
    """The her2jax dataset version directories under ``data_dir`` (complete ones only)."""
    root = Path(data_dir) / DATASET_NAME
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob(f"*/{FORMAT_VERSION}/{META_FILE}"))


def read_meta(version_dir: Path) -> dict:
    """``her2jax.json`` of a prepared dataset."""
    return read_json(Path(version_dir) / META_FILE, missing="dataset metadata is missing")


def data_source(version_dir: Path, split: str):
    """Random-access source over one split, every feature decoded (picklable)."""
    builder = tfds.builder_from_directory(str(version_dir))
    return builder.as_data_source(split=split)


class ImageReader:
    """The training hot path: only the ``image`` feature of one split, by position.

    Reads the split's ArrayRecord shards directly and parses just the image bytes out of
    each serialized example, skipping TFDS's per-feature decoding of a dozen small fields
    and its per-call thread pool (together ~40 % of the read time). Picklable: shards are
    reopened lazily in each process.
    """

    def __init__(self, version_dir: Path, split: str, shape: Sequence[int]):
        self._files = sorted(Path(version_dir).glob(f"{DATASET_NAME}-{split}.{FILE_FORMAT}-*"))
        if not self._files:
            raise Her2jaxError(f"dataset has no split {split!r}", file=str(version_dir))
        self._shape = tuple(int(s) for s in shape)
        self._readers = None
        self._starts = None

    def __getstate__(self):
        return {**self.__dict__, "_readers": None, "_starts": None}

    def _open(self) -> None:
        self._readers = [array_record_module.ArrayRecordReader(str(f), "readahead_buffer_size:0")
                         for f in self._files]
        self._starts = np.cumsum([0] + [r.num_records() for r in self._readers])

    def __len__(self) -> int:
        if self._readers is None:
            self._open()
        return int(self._starts[-1])

    def read_into(self, positions: Sequence[int], out: np.ndarray,
                  rows: Sequence[int] | None = None) -> None:
        """Writes the image at ``positions[i]`` into ``out[rows[i]]`` (rows default: i).

        Args:
          positions: positions in the split.
          out: [N, D, H, W, C] float16 batch buffer.
          rows: where each image goes in ``out``.
        """
        if self._readers is None:
            self._open()
        positions = np.asarray(positions, np.int64)
        rows = np.arange(len(positions)) if rows is None else np.asarray(rows)
        shard = np.searchsorted(self._starts, positions, side="right") - 1
        for s in np.unique(shard):
            members = np.flatnonzero(shard == s)
            records = self._readers[s].read((positions[members] - self._starts[s]).tolist())
            for row, record in zip(rows[members], records, strict=True):
                example = tf_example_pb2.Example.FromString(record)
                raw = example.features.feature["image"].bytes_list.value[0]
                out[row] = np.frombuffer(raw, np.float16).reshape(self._shape)
