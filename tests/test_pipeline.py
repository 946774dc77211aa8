"""The grain input pipeline: split selection, the (seed, step) order, process rows, global arrays."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest

from her2jax import labels
from her2jax.data import pipeline, tfds_builder
from her2jax.errors import Her2jaxError

from .conftest import small_data_config


def _config(**changes):
    config = small_data_config()
    for key, value in changes.items():
        setattr(config, key, value)
    return config


# ---------------------------------------------------------------- splits


def test_splits_partition_the_labelled_cases_by_centre(dataset, data_config):
    splits = pipeline.select_splits(dataset, data_config)
    assert set(splits) == {"train", "val", "test_CENTER_C"}
    assert set(splits["test_CENTER_C"].centers) == {"CENTER_C"}
    assert set(splits["train"].centers) | set(splits["val"].centers) == {"CENTER_A", "CENTER_B"}
    ids = [pid for s in splits.values() for pid in s.patient_ids]
    assert len(ids) == len(set(ids)), "no patient in two splits"
    labelled = [r for r in dataset.index
                if labels.derive_label("her2_3class", r["ihc"], r["ish"], r["her2"])[0]
                is not None]
    assert len(ids) == len(labelled) < len(dataset.index)
    for split in splits.values():   # labels agree with the raw fields in the index
        for pid, y in zip(split.patient_ids, split.labels, strict=True):
            row = next(r for r in dataset.index if r["patient_id"] == pid)
            assert labels.derive_label("her2_3class", row["ihc"], row["ish"], row["her2"])[0] == y


def test_validation_is_seeded_and_stratified(dataset):
    a = pipeline.select_splits(dataset, _config(seed=0))
    b = pipeline.select_splits(dataset, _config(seed=0))
    c = pipeline.select_splits(dataset, _config(seed=1))
    assert a["val"].patient_ids == b["val"].patient_ids
    assert a["val"].patient_ids != c["val"].patient_ids
    pool = np.concatenate([a["train"].labels, a["val"].labels])
    for k in np.unique(pool):
        if (pool == k).sum() >= 2:
            assert (a["val"].labels == k).sum() >= 1, "every class is represented in val"


def test_stratified_holdout_keeps_class_shares():
    y = np.repeat([0, 1, 2], [20, 50, 30])
    held = pipeline.stratified_holdout(y, 0.2, seed=3)
    assert [int((y[held] == k).sum()) for k in range(3)] == [4, 10, 6]


def test_one_dataset_serves_both_schemes(dataset):
    three = pipeline.select_splits(dataset, _config(scheme="her2_3class"))
    binary = pipeline.select_splits(dataset, _config(scheme="her2_binary"))
    assert binary["train"].class_names == ("HER2-negative", "HER2-positive")
    assert set(binary["test_CENTER_C"].labels.tolist()) <= {0, 1}
    assert set(three["test_CENTER_C"].labels.tolist()) <= {0, 1, 2}


def test_any_centre_can_be_read_unlabelled_too(dataset):
    split = pipeline.centre_split(dataset, ["CENTER_A"], "her2_3class", name="CENTER_A",
                                  labelled_only=False)
    assert len(split) == sum(r["center"] == "CENTER_A" for r in dataset.index)


@pytest.mark.parametrize("changes, match", [
    (dict(test_centers=("CENTER_X",)), "CENTER_X"),
    (dict(train_centers=("CENTER_A", "CENTER_C")), "leakage"),
    (dict(val_fraction=1.5), "val_fraction"),
    (dict(scheme="her2_4class"), "her2_4class"),
])
def test_bad_split_config_is_a_user_error(dataset, changes, match):
    with pytest.raises(Her2jaxError, match=match):
        pipeline.select_splits(dataset, _config(**changes))


def test_dataset_made_with_another_recipe_is_refused(prepared):
    config = copy.deepcopy(small_data_config())
    config.recipe.shape = (32, 32, 32)
    with pytest.raises(Her2jaxError, match=r"shape: dataset \[24, 24, 24\], config \[32, 32, 32\]"):
        pipeline.open_dataset(prepared.dataset_dir.parents[2], config)


def test_missing_dataset_is_a_user_error(tmp_path, data_config):
    with pytest.raises(Her2jaxError, match="run her2jax-prepare"):
        pipeline.open_dataset(tmp_path, data_config)


# ---------------------------------------------------------------- order


def test_batch_order_is_a_pure_function_of_seed_and_step():
    n, b = 23, 4
    spe = pipeline.steps_per_epoch(n, b)
    assert spe == 5
    first = [pipeline.batch_positions(n, b, seed=7, step=s) for s in range(spe)]
    epoch = np.concatenate(first)
    assert len(set(epoch.tolist())) == spe * b, "no repeats within an epoch"
    assert all((pipeline.batch_positions(n, b, 7, s) == first[s]).all() for s in range(spe))
    second = np.concatenate([pipeline.batch_positions(n, b, 7, s) for s in range(spe, 2 * spe)])
    assert not (second == epoch).all(), "each epoch has its own permutation"
    assert not (pipeline.batch_positions(n, b, 8, 0) == first[0]).all()


def _batch(dataset, split, step, processes=1, workers=0):
    """Global batch ``step`` assembled from the rows each of ``processes`` reads."""
    parts = []
    for p in range(processes):
        it = pipeline.train_batches(dataset, split, global_batch_size=8, seed=3, start_step=step,
                                    stop_step=step + 1, process_index=p,
                                    process_count=processes, worker_count=workers)
        parts.append(next(it))
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def test_batch_is_the_same_for_1_2_or_4_processes_and_0_or_2_workers(dataset, data_config):
    split = pipeline.select_splits(dataset, data_config)["train"]
    # Worker processes cost seconds to start: one worker run, at a later step.
    for step, layouts in [(0, [(2, 0), (4, 0)]), (3, [(4, 0), (1, 2)])]:
        reference = _batch(dataset, split, step)
        positions = pipeline.batch_positions(len(split), 8, 3, step)
        assert (reference["index"] == positions).all()
        assert (reference["label"] == split.labels[positions]).all()
        assert reference["image"].shape == (8, 24, 24, 24, 1)
        for row, (tfds_split, position) in enumerate(split.keys[positions]):
            source = tfds_builder.data_source(dataset.path, split.tfds_splits[tfds_split])
            example = source[int(position)]
            np.testing.assert_array_equal(reference["image"][row], example["image"])
            assert example["patient_id"].decode() == split.patient_ids[positions[row]]
        for processes, workers in layouts:
            other = _batch(dataset, split, step, processes, workers)
            for key in reference:
                np.testing.assert_array_equal(other[key], reference[key],
                                              err_msg=f"{processes=} {workers=} {key}")


def test_resuming_at_a_step_continues_the_same_stream(dataset, data_config):
    split = pipeline.select_splits(dataset, data_config)["train"]
    straight = list(pipeline.train_batches(dataset, split, global_batch_size=4, seed=0,
                                           start_step=0, stop_step=6))
    resumed = list(pipeline.train_batches(dataset, split, global_batch_size=4, seed=0,
                                          start_step=4, stop_step=6))
    assert len(straight) == 6 and len(resumed) == 2
    for a, b in zip(straight[4:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["index"], b["index"])


def test_rows_must_divide_among_processes(dataset, data_config):
    split = pipeline.select_splits(dataset, data_config)["train"]
    with pytest.raises(Her2jaxError, match="not divisible by the 3 processes"):
        pipeline.train_batches(dataset, split, global_batch_size=8, seed=0, start_step=0,
                               stop_step=1, process_count=3)
    with pytest.raises(Her2jaxError, match="exceeds"):
        pipeline.train_batches(dataset, split, global_batch_size=len(split) + 1, seed=0,
                               start_step=0, stop_step=1)


def test_eval_batches_cover_the_split_once_in_order(dataset, data_config):
    split = pipeline.select_splits(dataset, data_config)["test_CENTER_C"]
    batches = list(pipeline.eval_batches(dataset, split, global_batch_size=8))
    assert len(batches) == -(-len(split) // 8)
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])[valid]
    assert valid.sum() == len(split) and (index == np.arange(len(split))).all()
    two = [pipeline.eval_batches(dataset, split, global_batch_size=8, process_index=p,
                                 process_count=2) for p in range(2)]
    for whole, halves in zip(batches, zip(*two, strict=True), strict=True):
        np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]),
                                      whole["image"])


# ---------------------------------------------------------------- global arrays


def test_global_batch_is_sharded_over_the_data_axis(dataset, data_config):
    assert jax.device_count() == 8, "conftest asks for 8 CPU devices"
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    split = pipeline.select_splits(dataset, data_config)["train"]
    host = next(pipeline.train_batches(dataset, split, global_batch_size=8, seed=0,
                                       start_step=0, stop_step=1))
    batch = pipeline.to_global(host, mesh)
    image = batch["image"]
    assert image.shape == (8, 24, 24, 24, 1) and image.dtype == np.float16
    assert len(image.addressable_shards) == 4
    for shard in image.addressable_shards:
        rows = shard.index[0]
        assert shard.data.shape[0] == 2
        np.testing.assert_array_equal(np.asarray(shard.data), host["image"][rows])
    np.testing.assert_array_equal(np.asarray(batch["label"]), host["label"])


@pytest.mark.parametrize("ahead", [0, 1, 2, 5])
def test_device_prefetch_keeps_the_stream_and_sends_batches_ahead(dataset, data_config, ahead):
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    split = pipeline.select_splits(dataset, data_config)["train"]
    host = list(pipeline.train_batches(dataset, split, global_batch_size=8, seed=2,
                                       start_step=0, stop_step=4))
    pulled = []

    def counted():
        for batch in host:
            pulled.append(batch)
            yield batch

    stream = pipeline.device_batches(counted(), mesh, ahead=ahead)
    first = next(stream)
    # When the first batch is handed over, the next `ahead` are already on the devices.
    assert len(pulled) == min(ahead + 1, len(host))
    got = [first, *stream]
    assert len(got) == len(host)
    for batch, expected in zip(got, host, strict=True):
        assert set(batch) == set(expected)
        for key, value in batch.items():
            assert isinstance(value, jax.Array) and len(value.addressable_shards) == 4
            np.testing.assert_array_equal(np.asarray(value), expected[key])


@pytest.mark.parametrize("ahead", [-1, 1.5, "2"])
def test_bad_device_prefetch_is_a_user_error(ahead):
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    with pytest.raises(Her2jaxError, match="device prefetch"):
        next(pipeline.device_batches(iter([{"x": np.zeros(1)}]), mesh, ahead=ahead))


def test_permuted_training_labels_are_a_negative_control(dataset):
    plain = pipeline.select_splits(dataset, _config())
    permuted = pipeline.select_splits(dataset, _config(permute_train_labels=True))
    assert permuted["train"].patient_ids == plain["train"].patient_ids
    assert sorted(permuted["train"].labels) == sorted(plain["train"].labels)
    assert not (permuted["train"].labels == plain["train"].labels).all()
    # validation is shuffled too (the checkpoint is chosen on it), the test centre is not
    assert permuted["val"].patient_ids == plain["val"].patient_ids
    assert sorted(permuted["val"].labels) == sorted(plain["val"].labels)
    assert not (permuted["val"].labels == plain["val"].labels).all()
    np.testing.assert_array_equal(permuted["test_CENTER_C"].labels,
                                  plain["test_CENTER_C"].labels)
