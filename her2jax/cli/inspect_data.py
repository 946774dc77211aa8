"""A short look at a prepared dataset through the training pipeline.

  python -m her2jax.cli.inspect_data --data_dir=DIR [--config=configs/X.py] [--batch_size=8]

Prints the dataset, the train / val / test splits the config selects with their class
counts, and the shape and sharding of global training batch 0 on this host's devices.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from her2jax import cli
from her2jax.data import pipeline, recipes
from her2jax.errors import Her2jaxError

_DATA_DIR = flags.DEFINE_string("data_dir", None, "A directory written by her2jax-prepare.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (its `data` section).",
                                          lock_config=True)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Global batch size to read.", lower_bound=1)


def _main(argv: list[str]) -> None:
    del argv
    if not _DATA_DIR.value:
        raise Her2jaxError("--data_dir is required")
    import jax

    data_config = _CONFIG.value.data if _CONFIG.value is not None else recipes.data_config()
    dataset = pipeline.open_dataset(_DATA_DIR.value, data_config)
    print(f"dataset {dataset.path}: {len(dataset.index)} examples, centres "
          f"{', '.join(dataset.centers)}, recipe {dataset.meta['recipe']['name']} "
          f"{dataset.meta['recipe']['channels']} {dataset.meta['recipe']['shape']}")
    splits = pipeline.select_splits(dataset, data_config)
    print(f"scheme {data_config.scheme}: {pipeline.describe(splits)}")
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    batch_size = max(_BATCH_SIZE.value // jax.device_count(), 1) * jax.device_count()
    host = next(pipeline.train_batches(
        dataset, splits["train"], global_batch_size=batch_size, seed=data_config.seed,
        start_step=0, stop_step=1, process_index=jax.process_index(),
        process_count=jax.process_count(), worker_count=data_config.worker_count))
    batch = pipeline.to_global(host, mesh)
    image = batch["image"]
    print(f"global batch 0: image {image.shape} {image.dtype} over {len(image.sharding.device_set)}"
          f" device(s), labels {jax.device_get(batch['label']).tolist()}")


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
