"""Shared fixtures: one phantom cohort and one prepared dataset per test run, shared by the
pytest-xdist workers that ``make test`` starts."""

from __future__ import annotations

import atexit
import fcntl
import os
import pickle
import shutil
import subprocess
import tempfile
from pathlib import Path

# Several fake CPU devices so sharding code runs as on a multi-device host; must be set
# before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One JAX persistent compilation cache for the test run, shared by this process and every
# process it starts (they inherit the environment): the training subprocesses compile the
# same programs again and again (the straight 160-step run: 23 s with a cold cache, 11.5 s
# with a warm one, on 2 cores). Every program is cached (JAX's default keeps only those that
# took a second to compile), the small eager ones of model initialisation included. Set
# before jax is imported; a cache directory given from outside is used as it is and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="her2jax-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


def pytest_sessionstart(session):
    """The orbax / tensorstore workarounds, as the engine's command line installs them."""
    del session
    from her2jax.train import orbax_quirks

    orbax_quirks.install()

# Small enough for 2 CPU cores, large enough for three centres, all classes and a few
# unlabellable cases.
PHANTOM = dict(patients=36, centers=3, seed=0, shape=(48, 48, 24))


def once_per_run(tmp_path_factory, name: str, build):
    """``build(path)``'s result, built once per test run in a new directory ``path``.

    Under pytest-xdist every worker is its own process with its own session fixtures; the
    workers' base temp directories share a parent, so the first worker to take the lock builds
    there and the others read the result it pickled (the same object, e.g. ``prepare``'s
    counts of that one build)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path, result = root / name, root / f"{name}.pickle"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
        if result.exists():
            return pickle.loads(result.read_bytes())
        shutil.rmtree(path, ignore_errors=True)   # a worker that died half-way
        path.mkdir()
        value = build(path)
        result.write_bytes(pickle.dumps(value))
        return value


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory):
    """A tiny phantom cohort in the MAMA-MIA layout (read-only for tests: copy to modify)."""
    from her2jax.data import phantom

    return once_per_run(tmp_path_factory, "phantom",
                        lambda path: phantom.write_cohort(path, **PHANTOM))


def small_data_config():
    """The default data section at a test-sized crop (24^3), centre C held out."""
    from her2jax.data import recipes

    config = recipes.data_config("fmbcmri")
    config.recipe.shape = (24, 24, 24)
    config.test_centers = ("CENTER_C",)
    config.worker_count = 0
    return config


@pytest.fixture(scope="session")
def data_config():
    return small_data_config()


@pytest.fixture(scope="session")
def prepared(phantom_cohort, data_config, tmp_path_factory):
    """The phantom cohort prepared once (read-only for tests): a ``prepare.Prepared``."""
    from her2jax.data import prepare

    return once_per_run(tmp_path_factory, "data", lambda path: prepare.prepare(
        phantom_cohort, path, data_config, workers=1, progress=False))


@pytest.fixture(scope="session")
def dataset(prepared, data_config):
    from her2jax.data import pipeline

    return pipeline.open_dataset(prepared.dataset_dir.parents[2], data_config)



@pytest.fixture(scope="session")
def data_dir(prepared):
    """The shared dataset's ``--data_dir`` (read-only for tests)."""
    return prepared.dataset_dir.parents[2]


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory):
    """(workdir, TrainResult) of a 12-step tiny-ViT run on the shared dataset, trained once per
    test run. Tests that change the workdir beyond adding eval / features / predict outputs
    work on a copy."""
    from her2jax.train import loop

    from .test_train import small_config

    workdir = tmp_path_factory.mktemp("run")
    return workdir, loop.train(small_config(data_dir), workdir, progress=False)


@pytest.fixture(scope="session")
def straight(data_dir, tmp_path_factory):
    """A 160-step run through the CLI, uninterrupted, with a stub ``tensorflow`` first on the
    path that records any import attempt (training must not import TensorFlow): the reference
    for every kill-and-resume test."""
    from .test_train import _her2jax

    root = tmp_path_factory.mktemp("straight")
    env, marker = tensorflow_stub(root)
    _her2jax(root / "run", data_dir, env=env)
    assert not marker.exists(), marker.read_text() if marker.exists() else ""
    return root / "run"

@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size, *options)`` -> a new tmpfs mount point (options such as ``"ro"``),
    unmounted at the end. The tests run as root, which ignores file permissions, so a small or
    read-only mount is the only way to refuse a write (test_faults, test_logger)."""
    mounted = []

    def mount(size: int, *options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}",
                                                                          *options]),
                                 "tmpfs", str(point)], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(point)], check=True)


def materialize(make_model, seed: int = 0):
    """``make_model()`` built from shapes only and filled with seeded random values.

    Eager random initialisation compiles one small XLA program per parameter shape (seconds
    on 2 cores); tests that only need *some* well-scaled weights fill them on the host.
    BatchNorm statistics get mean 0 / var 1 and scales 1, like a fresh model.
    """
    import jax
    import numpy as np
    from flax import nnx

    model = nnx.eval_shape(make_model)
    state = nnx.state(model)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1].key if hasattr(path[-1], "key") else path[-1])
        if name in ("var", "scale"):
            return np.ones(leaf.shape, leaf.dtype)
        if name in ("mean", "bias"):
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(fill, state))
    return model


def tensorflow_stub(root):
    """(env, marker): PYTHONPATH puts a `tensorflow` package first that records any import
    attempt in ``marker`` (with the importing stack) and then fails the import."""
    import os
    from pathlib import Path

    root = Path(root)
    stub = root / "stub" / "tensorflow"
    stub.mkdir(parents=True)
    marker = root / "tensorflow-imported"
    (stub / "__init__.py").write_text(
        "import pathlib, traceback\n"
        f"pathlib.Path({str(marker)!r}).write_text(''.join(traceback.format_stack()))\n"
        "raise ImportError('her2jax must not import tensorflow')\n")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub.parent), str(repo)])}
    return env, marker


def kill_at_first_checkpoint(process, latest: Path, *, timeout: float = 600) -> int:
    """SIGKILLs a running ``her2jax`` process as soon as ``latest`` (a checkpoints/latest
    folder) holds a complete step, and returns that step. Fails if the process ended first."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if latest.exists() and any(p.name.isdigit() for p in latest.iterdir()):
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL, "the run ended before it was killed"
    return max(int(p.name) for p in latest.iterdir() if p.name.isdigit())


def run_her2jax(mode: str, workdir: Path, data_dir: Path, args, *extra: str, wait: bool = True,
                check: bool = True, devices: int | None = None, timeout: float = 900):
    """``python -m her2jax.main --mode=MODE --workdir=WORKDIR ARGS --config.data.data_dir=...
    EXTRA`` from the repository root: the finished process (asserted to exit 0 with
    ``check``), or the running ``Popen`` without ``wait``; ``devices`` sets the fake CPU device
    count of the child."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "her2jax.main", f"--mode={mode}", f"--workdir={workdir}",
               *args, f"--config.data.data_dir={data_dir}", *extra]
    env = None
    if devices:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    repo = Path(__file__).resolve().parents[1]
    if not wait:
        return subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=timeout,
                            env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result
