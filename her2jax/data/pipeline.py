"""Input pipeline: prepared dataset -> train / val / test splits -> global ``jax.Array`` batches.

Which centres train, validate and test is chosen here, from the config, so one prepared
dataset serves any leave-centre-out rotation and either label scheme.

The order of training examples is a pure function of (seed, step): epoch ``e`` is the
permutation ``default_rng((seed, e))`` of the training split, global batch ``b`` holds the
permuted positions ``[j*B, (j+1)*B)`` with ``j = b mod steps_per_epoch``, and each process
reads only its own rows of it. The resume state is the step: a run saved with any number of
devices, processes or workers resumes with any other and sees the same examples.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import numpy as np
from absl import flags
from grain.multiprocessing import SharedMemoryArray

from her2jax import labels
from her2jax.data import preprocess, tfds_builder
from her2jax.data.recipes import plain
from her2jax.errors import Her2jaxError

OOF = "oof"
"""A cross-validation fold's held-out split (``data.cv_holdout``)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A prepared ``her2_dce_mri`` dataset.

    Attributes:
      path: its version directory.
      meta: ``her2jax.json`` (recipe, hashes, splits).
      index: one dict per example (split, position, patient_id, center, ihc, ish, her2).
    """

    path: Path
    meta: dict
    index: tuple[dict, ...]

    @property
    def centers(self) -> tuple[str, ...]:
        return tuple(sorted(v["center"] for v in self.meta["splits"].values()))

    @property
    def split_of(self) -> dict[str, str]:
        """Centre name -> TFDS split name."""
        return {v["center"]: s for s, v in self.meta["splits"].items()}


@dataclasses.dataclass(frozen=True)
class Split:
    """A selection of examples, e.g. ``train``, ``val`` or ``test_CENTER_C``.

    Attributes:
      name: the split's name.
      tfds_splits: the TFDS (centre) splits it reads from.
      keys: [N, 2] int64 rows of (index into tfds_splits, position in that TFDS split).
      labels: [N] int32 task labels (-1 where unknown: only in unlabelled splits).
      patient_ids: [N] patient ids.
      centers: [N] centre names.
      class_names: the scheme's class names.
    """

    name: str
    tfds_splits: tuple[str, ...]
    keys: np.ndarray
    labels: np.ndarray
    patient_ids: tuple[str, ...]
    centers: tuple[str, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(int(x) for x in self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.class_names)}


def open_dataset(data_dir, data_config) -> Dataset:
    """Finds the dataset in ``data_dir`` and checks it was made with the config's recipe."""
    found = tfds_builder.find_datasets(Path(data_dir))
    if not found:
        raise Her2jaxError("no her2jax dataset here; run her2jax-prepare first",
                           file=str(data_dir))
    if len(found) > 1:
        raise Her2jaxError("holds several her2jax datasets (" + ", ".join(
            d.parent.name for d in found) + "); keep one per --data_dir", file=str(data_dir))
    path = found[0]
    meta = tfds_builder.read_meta(path)
    recipe = plain(data_config.recipe)
    if meta["recipe_fingerprint"] != preprocess.recipe_fingerprint(recipe):
        made = meta["recipe"]
        diff = ", ".join(f"{k}: dataset {made.get(k)!r}, config {recipe.get(k)!r}"
                         for k in sorted(set(made) | set(recipe)) if made.get(k) != recipe.get(k))
        raise Her2jaxError(f"dataset was prepared with another recipe ({diff}); prepare it "
                           "again with this config or use the config it was made with",
                           file=str(path))
    with open(path / tfds_builder.INDEX_FILE, newline="") as f:
        index = tuple({**row, "position": int(row["position"]), "her2": int(row["her2"])}
                      for row in csv.DictReader(f))
    return Dataset(path, meta, index)


def centre_split(dataset: Dataset, centers: Sequence[str], scheme: str, *, name: str,
                 labelled_only: bool = True) -> Split:
    """The examples of the given centres, labelled under ``scheme`` (unlabelled ones dropped
    unless ``labelled_only`` is False, where they get label -1)."""
    unknown = sorted(set(centers) - set(dataset.centers))
    if unknown:
        raise Her2jaxError(f"centre(s) {', '.join(unknown)} not in the dataset (it has "
                           f"{', '.join(dataset.centers)})", key="data.centers")
    tfds_splits = tuple(dataset.split_of[c] for c in centers)
    rows, keys, ys = [], [], []
    for row in dataset.index:
        if row["split"] not in tfds_splits:
            continue
        y, _ = labels.derive_label(scheme, row["ihc"], row["ish"], row["her2"])
        if y is None and labelled_only:
            continue
        rows.append(row)
        keys.append((tfds_splits.index(row["split"]), row["position"]))
        ys.append(-1 if y is None else y)
    return Split(name=name, tfds_splits=tfds_splits,
                 keys=np.asarray(keys, np.int64).reshape(-1, 2),
                 labels=np.asarray(ys, np.int32),
                 patient_ids=tuple(r["patient_id"] for r in rows),
                 centers=tuple(r["center"] for r in rows),
                 class_names=labels.CLASS_NAMES[scheme])


def subset(split: Split, rows: np.ndarray, name: str) -> Split:
    """The examples ``rows`` ([M] int positions) of ``split``, in that order, named ``name``."""
    return dataclasses.replace(split, name=name, keys=split.keys[rows], labels=split.labels[rows],
                               patient_ids=tuple(split.patient_ids[i] for i in rows),
                               centers=tuple(split.centers[i] for i in rows))


def stratified_holdout(labels_: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean [N]: a seeded, per-class ``fraction`` of the examples (at least one of every
    class with two or more examples, when fraction > 0)."""
    held = np.zeros(len(labels_), bool)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels_):
        members = np.flatnonzero(labels_ == c)
        n = int(round(fraction * len(members)))
        if fraction > 0 and len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        held[rng.permutation(members)[:n]] = True
    return held


def training_pool(dataset: Dataset, data_config) -> Split:
    """Every labelled patient of the training centres (``data.train_centers``, default every
    centre not in ``data.test_centers``): what train and val (or a cross-validation's folds)
    are drawn from."""
    scheme = data_config.scheme
    if scheme not in labels.SCHEMES:
        raise Her2jaxError(f"unknown scheme {scheme!r} (expected {' or '.join(labels.SCHEMES)})",
                           key="data.scheme")
    test = tuple(data_config.test_centers)
    train = tuple(data_config.train_centers) or tuple(c for c in dataset.centers if c not in test)
    both = sorted(set(train) & set(test))
    if both:
        raise Her2jaxError(f"centre(s) {', '.join(both)} both train and test (leakage)",
                           key="data.test_centers")
    if not train:
        raise Her2jaxError("no training centre left", key="data.train_centers")
    return centre_split(dataset, train, scheme, name="train")


def select_splits(dataset: Dataset, data_config) -> dict[str, Split]:
    """``train``, ``val`` (seeded, stratified, from the training centres) and ``test_<centre>``
    for every held-out centre, under the config's label scheme; with ``data.cv_holdout``
    (a cross-validation fold) also ``oof``, those patients, out of train and val."""
    pool = training_pool(dataset, data_config)
    if not 0 <= data_config.val_fraction < 1:
        raise Her2jaxError(f"must be in [0, 1), got {data_config.val_fraction}",
                           key="data.val_fraction")
    scheme, test = data_config.scheme, tuple(data_config.test_centers)
    oof = None
    holdout = tuple(data_config.get("cv_holdout", ()))
    if holdout:
        pool, oof = _hold_out(pool, holdout)
    held = stratified_holdout(pool.labels, data_config.val_fraction, data_config.seed)
    splits = {"train": subset(pool, np.flatnonzero(~held), "train"),
              "val": subset(pool, np.flatnonzero(held), "val")}
    if data_config.get("permute_train_labels", False):
        # The negative control: the validation labels too, or the checkpoint chosen on them
        # would carry real-label information into a run that must have none.
        rng = np.random.default_rng((data_config.seed, 1))
        for name in ("train", "val"):
            splits[name] = dataclasses.replace(splits[name],
                                               labels=rng.permutation(splits[name].labels))
    if oof is not None:
        splits[OOF] = oof
    for center in test:
        name = f"test_{dataset.split_of.get(center, center)}"
        splits[name] = centre_split(dataset, [center], scheme, name=name)
    _check_no_patient_overlap(splits)
    return splits


def _hold_out(pool: Split, holdout: Sequence[str]) -> tuple[Split, Split]:
    """(the pool without the patients of ``holdout``, split ``oof`` of them): a
    cross-validation fold's held-out patients (``data.cv_holdout``)."""
    ids = set(map(str, holdout))
    missing = sorted(ids - set(pool.patient_ids))
    if missing:
        raise Her2jaxError(f"holds {len(missing)} patient(s) that are not labelled cases of "
                           f"the training centres ({', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''})", key="data.cv_holdout")
    out = np.array([pid in ids for pid in pool.patient_ids], bool)
    return subset(pool, np.flatnonzero(~out), "train"), subset(pool, np.flatnonzero(out), OOF)


def named_splits(dataset: Dataset, data_config, names=()) -> dict[str, Split]:
    """Splits to evaluate by name: default val and every test split; a name from
    :func:`select_splits`, or any centre (whole, labelled cases only)."""
    selected = select_splits(dataset, data_config)
    if not names:
        return {k: v for k, v in selected.items() if k != "train"}
    out = {}
    for name in names:
        if name in selected:
            out[name] = selected[name]
        elif name in dataset.centers:
            out[name] = centre_split(dataset, [name], data_config.scheme, name=name)
        else:
            raise Her2jaxError(f"unknown split {name!r} (known: {', '.join(selected)}, or a "
                               f"centre: {', '.join(dataset.centers)})", key="splits")
    return out


def _check_no_patient_overlap(splits: dict[str, Split]) -> None:
    owner: dict[str, str] = {}
    for name, split in splits.items():
        for pid in split.patient_ids:
            if pid in owner and owner[pid] != name:
                raise Her2jaxError(f"appears in both {owner[pid]} and {name} (leakage)",
                                   patient=pid)
            owner[pid] = name


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches per epoch (the remainder is left out, differently each epoch)."""
    if global_batch_size < 1 or num_examples < global_batch_size:
        raise Her2jaxError(f"global batch size {global_batch_size} exceeds the "
                           f"{num_examples} training examples", key="train.batch_size")
    return num_examples // global_batch_size


def batch_positions(num_examples: int, global_batch_size: int, seed: int, step: int) -> np.ndarray:
    """[B] positions (into the split) of global training batch ``step``; pure in its args."""
    epoch, j = divmod(step, steps_per_epoch(num_examples, global_batch_size))
    permutation = np.random.default_rng((seed, epoch)).permutation(num_examples)
    return permutation[j * global_batch_size:(j + 1) * global_batch_size]


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """This process's contiguous rows of a global batch."""
    if global_batch_size % process_count:
        raise Her2jaxError(f"global batch size {global_batch_size} is not divisible by the "
                           f"{process_count} processes", key="train.batch_size")
    per = global_batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


class _Reader:
    """Reads rows of a Split into a host batch. Picklable: shards open lazily per process.

    In grain worker processes (``shared_memory``) the batch's image is assembled straight
    into shared memory, which grain hands to the main process without another copy.
    """

    def __init__(self, dataset: Dataset, split: Split, shared_memory: bool = False):
        self._split = split
        self._shared_memory = shared_memory
        self._shape = tuple(dataset.meta["image_shape"])
        self._readers = [tfds_builder.ImageReader(dataset.path, s, self._shape)
                         for s in split.tfds_splits]

    def read(self, positions: np.ndarray, valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Batch of the given split positions.

        Returns:
          image [n, D, H, W, C] float16, label [n] int32, index [n] int32 (the position in
          the split: with the step, it keys random augmentation), valid [n] bool.
        """
        shape = (len(positions), *self._shape)
        image = (SharedMemoryArray(shape, np.float16) if self._shared_memory
                 else np.empty(shape, np.float16))
        keys = self._split.keys[positions]
        for s, reader in enumerate(self._readers):
            rows = np.flatnonzero(keys[:, 0] == s)
            if len(rows):
                reader.read_into(keys[rows, 1], image, rows)
        return {
            "image": image,
            "label": self._split.labels[positions],
            "index": np.asarray(positions, np.int32),
            "valid": np.ones(len(positions), bool) if valid is None else valid,
        }


class _TrainBatch(grain.transforms.Map):
    def __init__(self, reader: _Reader, n: int, global_batch_size: int, seed: int, rows: slice):
        self._reader, self._n, self._b, self._seed, self._rows = (
            reader, n, global_batch_size, seed, rows)

    def map(self, step: int) -> dict[str, np.ndarray]:
        return self._reader.read(batch_positions(self._n, self._b, self._seed, step)[self._rows])


class _EvalBatch(grain.transforms.Map):
    def __init__(self, reader: _Reader, n: int, global_batch_size: int, rows: slice):
        self._reader, self._n, self._b, self._rows = reader, n, global_batch_size, rows

    def map(self, b: int) -> dict[str, np.ndarray]:
        positions = np.arange(b * self._b, (b + 1) * self._b)
        valid = positions < self._n
        positions = np.where(valid, positions, 0)  # padding repeats example 0, marked invalid
        return self._reader.read(positions[self._rows], valid[self._rows])


def _iterate(dataset: grain.MapDataset, worker_count: int, prefetch: int) -> Iterator[dict]:
    it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        # grain's workers read absl flags; outside an absl app (tests, notebooks) nothing
        # parsed them, and their defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=prefetch))
    return iter(it)


def train_batches(dataset: Dataset, split: Split, *, global_batch_size: int, seed: int,
                  start_step: int, stop_step: int, process_index: int = 0,
                  process_count: int = 1, worker_count: int = 0,
                  prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of global training batches ``start_step .. stop_step - 1``.

    Batches are host numpy arrays (see ``_Reader.read``); :func:`to_global` makes them
    sharded ``jax.Array`` s.
    """
    rows = process_rows(global_batch_size, process_index, process_count)
    steps_per_epoch(len(split), global_batch_size)  # fail early on a too-small split
    mapped = grain.MapDataset.range(start_step, stop_step).map(
        _TrainBatch(_Reader(dataset, split, worker_count > 0), len(split), global_batch_size, seed, rows))
    return _iterate(mapped, worker_count, prefetch)


def eval_batches(dataset: Dataset, split: Split, *, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                 prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """The whole split once, in order; the last batch is padded (``valid`` False)."""
    rows = process_rows(global_batch_size, process_index, process_count)
    num_batches = -(-len(split) // global_batch_size)
    mapped = grain.MapDataset.range(0, num_batches).map(
        _EvalBatch(_Reader(dataset, split, worker_count > 0), len(split), global_batch_size, rows))
    return _iterate(mapped, worker_count, prefetch)


def clinical_columns(dataset: Dataset, split: Split, names) -> dict[str, list[str]]:
    """The carried clinical columns (those of ``names`` present) for every example of a
    split, in split order: e.g. for subgroup tables in predictions.csv."""
    sources = [tfds_builder.data_source(dataset.path, s) for s in split.tfds_splits]
    rows = [json.loads(sources[int(s)][int(p)]["clinical"].decode()) for s, p in split.keys]
    present = [n for n in names if any(n in row for row in rows)]
    return {n: [str(row.get(n, "")) for row in rows] for n in present}


def to_global(batch: dict[str, np.ndarray], mesh, axis: str = "data") -> dict:
    """Host-local rows -> global ``jax.Array`` s sharded over the mesh's ``axis``."""
    import jax  # the data layer stays importable without initialising a backend
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(axis))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def device_batches(host_batches: Iterator[dict[str, np.ndarray]], mesh, *, ahead: int = 2,
                   axis: str = "data") -> Iterator[dict]:
    """Global batches from host batches, with ``ahead`` of them already sent to the devices.

    :func:`to_global` starts a host-to-device copy and returns; keeping the next ``ahead``
    batches started while the current step runs means a step never waits for its input's
    copy (double buffering at ``ahead=2``). The batches and their order are exactly those of
    ``host_batches``; stopping early only drops copies already made. ``ahead=0`` sends each
    batch when it is asked for.
    """
    if not isinstance(ahead, int) or ahead < 0:
        raise Her2jaxError(f"device prefetch {ahead!r} is not a count of batches (0 or more)",
                           key="data.device_prefetch")
    queue: deque = deque()
    for host in host_batches:
        queue.append(to_global(host, mesh, axis))
        if len(queue) > ahead:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def describe(splits: dict[str, Split]) -> str:
    """One line: examples per split and class."""
    return "; ".join(f"{name} {len(s)} " + json.dumps(s.class_counts())
                     for name, s in splits.items())
