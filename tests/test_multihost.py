"""Multi-process runs with real processes on loopback: JAX's coordination service and gloo
collectives on CPU, started by ``launch/local_multiprocess.sh`` exactly as a user would.

A small ResNet (BatchNorm synchronised over all devices of all processes) trained with plain
SGD, so that parameters after N steps compare tightly across topologies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from her2jax import distributed
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files
from her2jax.train import inference, logger, loop
from her2jax.train import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "local_multiprocess.sh"
STEPS = 8
TRAIN_ARGS = [
    "--config=configs/tiny_cpu.py", "--config.data.recipe.shape=(24,24,24)",
    "--config.model.encoder=resnet3d", "--config.model.resnet.depth=10",
    "--config.model.resnet.widen_factor=0.125",
    "--config.train.optimizer=sgd", "--config.train.momentum=0.0",
    "--config.train.learning_rate=0.01", "--config.train.warmup_steps=0",
    f"--config.train.steps={STEPS}", "--config.train.batch_size=8",
    "--config.train.eval_batch_size=8", "--config.train.save_every=1",
    f"--config.train.keep_latest={STEPS + 1}", "--config.train.eval_every=4",
    "--config.train.log_every=1", "--noprogress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _command(processes: int, args: list[str]) -> list[str]:
    engine = [sys.executable, "-m", "her2jax.main", *args]
    if processes == 1:
        return engine
    return ["bash", str(LAUNCH), str(processes), f"--port={_free_port()}", "--", *engine]


def _start(args: list[str], *, processes: int, devices: int) -> subprocess.Popen:
    # A session of its own: the test can kill the launcher and every task at once.
    return subprocess.Popen(_command(processes, args), cwd=REPO, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _run(args: list[str], *, processes: int, devices: int, timeout: int = 600):
    process = _start(args, processes=processes, devices=devices)
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-4000:]
    return out, err


def _train(workdir: Path, data_dir: Path, *, processes: int, devices: int, start=False):
    args = [f"--workdir={workdir}", *TRAIN_ARGS, f"--config.data.data_dir={data_dir}"]
    if start:
        return _start(args, processes=processes, devices=devices)
    return _run(args, processes=processes, devices=devices)


def _wait_for_checkpoint(workdir: Path, process: subprocess.Popen, at_least: int = 1) -> int:
    """Waits until a complete ``latest`` checkpoint >= ``at_least`` exists; returns its step."""
    latest = workdir / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        steps = [int(p.name) for p in latest.glob("*") if p.name.isdigit()
                 and (p / "commit_success.txt").exists()] if latest.exists() else []
        if steps and max(steps) >= at_least:
            return max(steps)
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.05)
    raise AssertionError("no checkpoint within 300 s")


def _kill_all(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)


def _state(workdir: Path, step: int | None = None):
    trained = inference.load_trained(workdir, which="latest", step=step)
    return jax.device_get((trained.state.params, trained.state.rest))


def _assert_close(a, b, *, rtol: float, atol: float) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _train_records(workdir: Path) -> dict[int, dict]:
    records = [r for r in logger.read_metrics(workdir) if r["split"] == "train"]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r for r in records}


@pytest.fixture(scope="module")
def two_processes(data_dir, tmp_path_factory) -> tuple[Path, str]:
    """2 processes x 2 CPU devices, uninterrupted."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    out, _ = _train(workdir, data_dir, processes=2, devices=2)
    return workdir, out


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory) -> Path:
    """1 process x 4 CPU devices, uninterrupted: the same global batches."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    _train(workdir, data_dir, processes=1, devices=4)
    return workdir


def test_two_processes_train_like_one_process_with_as_many_devices(two_processes, one_process):
    workdir, out = two_processes
    assert out.count(f"done at step {STEPS}") == 2     # both tasks finished
    multi, single = _train_records(workdir), _train_records(one_process)
    assert sorted(multi) == list(range(1, STEPS + 1))  # one log line per step, no duplicates
    # Loss and gradient norm of the first step: the same global batch, the same gradient.
    for key in ("loss", "grad_norm"):
        assert multi[1][key] == pytest.approx(single[1][key], rel=1e-5), key
    # Parameters and BatchNorm statistics after one step, then after all of them (plain SGD).
    _assert_close(_state(workdir, step=1), _state(one_process, step=1), rtol=1e-5, atol=1e-6)
    _assert_close(_state(workdir), _state(one_process), rtol=1e-4, atol=1e-5)
    for step in range(1, STEPS + 1):
        assert multi[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-4), step


def test_only_process_0_writes_logs_and_the_config(two_processes):
    workdir, _ = two_processes
    record = json.loads((workdir / "config.json").read_text())
    assert record["provenance"]["processes"] == 2
    assert record["provenance"]["devices"].startswith("4 x")
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    val = [r["step"] for r in logger.read_metrics(workdir) if r["split"] == "val"]
    assert val == [4, 8]
    assert not list(workdir.rglob("*.tmp")), "a temporary file was left behind"


def test_eval_with_two_processes_writes_each_patient_once(two_processes, tmp_path):
    workdir, _ = two_processes
    _run([f"--workdir={workdir}", "--mode=eval", "--bootstrap=50", "--noprogress"],
         processes=2, devices=2)
    copy = tmp_path / "single"       # the same checkpoint evaluated by this one process
    copy.mkdir()
    for name in ("config.json", "checkpoints"):
        os.symlink(workdir / name, copy / name)
    inference.evaluate(copy, n_boot=50)
    for name in ("val", "test_CENTER_C"):
        multi = files.read_predictions(workdir / "eval" / name / "predictions.csv")
        single = files.read_predictions(copy / "eval" / name / "predictions.csv")
        assert multi["patient_id"].is_unique and len(multi) > 0
        assert list(multi["patient_id"]) == list(single["patient_id"])
        prob = [c for c in multi.columns if c.startswith("prob_")]
        np.testing.assert_allclose(multi[prob].to_numpy(), single[prob].to_numpy(), atol=1e-5)
    assert (workdir / "eval" / "summary.txt").read_text().count("test_CENTER_C (n=") == 1


def _keep_checkpoints_up_to(workdir: Path, step: int) -> None:
    """Removes the checkpoints after ``step``: the workdir of a run stopped there."""
    for manager in ("latest", "best"):
        for path in (workdir / "checkpoints" / manager).glob("*"):
            if path.name.isdigit() and int(path.name) > step:
                shutil.rmtree(path)


def test_both_processes_killed_then_resumed_by_two_or_by_one(two_processes, data_dir,
                                                             tmp_path):
    straight, _ = two_processes
    workdir = tmp_path / "run"
    process = _train(workdir, data_dir, processes=2, devices=2, start=True)
    killed_at = _wait_for_checkpoint(workdir, process)
    _kill_all(process)
    assert killed_at < STEPS
    alone = tmp_path / "alone"
    shutil.copytree(workdir, alone)

    # The same two processes again: the uninterrupted run's parameters, bit for bit.
    _train(workdir, data_dir, processes=2, devices=2)
    for a, b in zip(jax.tree.leaves(_state(straight)), jax.tree.leaves(_state(workdir)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(_train_records(workdir)) == list(range(1, STEPS + 1))

    # The same checkpoint resumed by one process (this one, 8 devices): same examples.
    config = workdir_lib.read(alone)["config"]
    loop.train(ml_collections.ConfigDict(config), alone, progress=False)
    _assert_same_run(alone, straight, killed_at)


def test_a_one_process_checkpoint_resumes_with_two_processes(one_process, two_processes,
                                                             data_dir, tmp_path):
    straight, _ = two_processes
    workdir = tmp_path / "run"
    shutil.copytree(one_process, workdir)
    _keep_checkpoints_up_to(workdir, 3)
    _train(workdir, data_dir, processes=2, devices=2)
    _assert_same_run(workdir, straight, 3)


def _assert_same_run(workdir: Path, reference: Path, resumed_after: int) -> None:
    """The resumed part saw the same examples as ``reference``: the same losses and, at the
    end, the same parameters (within float tolerance: another reduction order)."""
    resumed, expected = _train_records(workdir), _train_records(reference)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(resumed_after + 1, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-4), step
    _assert_close(_state(workdir), _state(reference), rtol=1e-4, atol=1e-5)


def test_sigterm_to_one_process_saves_on_every_process_and_stops(data_dir, tmp_path):
    workdir = tmp_path / "run"
    process = _train(workdir, data_dir, processes=2, devices=2, start=True)
    _wait_for_checkpoint(workdir, process)
    os.kill(_task_pid(process.pid, 1), signal.SIGTERM)     # the notice reaches one host only
    sent = time.monotonic()
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert time.monotonic() - sent < 30
    stopped = [line.split("]", 1)[1] for line in out.splitlines() if "preempted at step" in line]
    assert len(stopped) == 2 and stopped[0] == stopped[1], out   # both, at the same step
    step = int(stopped[0].split("preempted at step")[1].split(";")[0])
    assert step < STEPS
    assert (workdir / "checkpoints" / "latest" / str(step) / "commit_success.txt").exists()


def test_a_dead_peer_stops_the_survivor_and_the_launcher_names_it(data_dir, tmp_path):
    workdir = tmp_path / "run"
    args = [f"--workdir={workdir}", *TRAIN_ARGS, f"--config.data.data_dir={data_dir}",
            "--config.train.steps=100000", "--heartbeat_timeout_s=5"]
    process = _start(args, processes=2, devices=2)
    _wait_for_checkpoint(workdir, process)
    os.kill(_task_pid(process.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    _, err = process.communicate(timeout=120)
    waited = time.monotonic() - killed
    assert process.returncode != 0
    assert waited < 5 + 30, f"the survivor took {waited:.0f} s to stop"
    assert "FAILED: task 1 died first (killed by signal 9 (KILL))" in err, err[-3000:]
    assert "task 0" in err and "killed by signal 6 (ABRT)" in err   # the survivor aborted


def _task_pid(launcher: int, task: int) -> int:
    """The pid of task ``task`` of a local_multiprocess.sh launcher."""
    import psutil

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if f"--process_id={task}" in command and "her2jax.main" in command:
            return child.pid
    raise AssertionError(f"no task {task} under launcher {launcher}")


# ---------------------------------------------------------------- the runtime's rules


def test_a_single_process_starts_no_runtime():
    assert distributed.detect(env={}) is None
    assert distributed.detect(env={"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0",
                                   "SLURM_NTASKS": "1"}) is None


@pytest.mark.parametrize("env, source", [
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "tpu"),
    ({"HER2JAX_DISTRIBUTED": "auto"}, "auto"),
])
def test_the_environment_says_when_to_start(env, source):
    launch = distributed.detect(env=env)
    assert launch.source == source and launch.coordinator_address is None


def test_jax_environment_variables_and_flags():
    launch = distributed.detect(env={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                                     "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
    assert (launch.coordinator_address, launch.num_processes, launch.process_id) == \
        ("10.0.0.1:1234", 2, 1)
    launch = distributed.detect("h:1", 4, 3, env={"SLURM_JOB_ID": "1"})
    assert launch.source == "flags" and launch.process_id == 3


@pytest.mark.parametrize("args, env, message", [
    (("h:1", None, None), {}, "without --num_processes --process_id"),
    ((None, 2, 1), {}, "without --coordinator_address"),
    (("h", 2, 1), {}, "must be host:port"),
    (("h:1", 2, 2), {}, "must lie in [0, --num_processes=2)"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1"}, "without JAX_NUM_PROCESSES"),
    ((None, None, None), {"OMPI_COMM_WORLD_SIZE": "two"}, "is not an integer"),
])
def test_half_given_settings_are_refused(args, env, message):
    with pytest.raises(Her2jaxError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        distributed.detect(*args, env=env)


def test_a_half_given_launch_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "her2jax.main", f"--workdir={tmp_path}",
                             "--mode=eval", "--num_processes=2"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--num_processes given without --coordinator_address --process_id" in result.stderr


# ---------------------------------------------------------------- MoCo v3 pretraining

PRETRAIN_STEPS = 6
PRETRAIN_ARGS = [
    "--mode=pretrain", "--config=configs/pretrain_tiny.py",
    f"--config.train.steps={PRETRAIN_STEPS}", "--config.train.warmup_steps=2",
    "--config.train.batch_size=8", "--config.train.eval_batch_size=8",
    "--config.train.log_every=1", f"--config.train.eval_every={PRETRAIN_STEPS}",
    "--config.train.save_every=3", "--config.data.test_centers=('CENTER_C',)", "--noprogress"]


def _pretrain(workdir: Path, data_dir: Path, *, processes: int, devices: int) -> str:
    out, _ = _run([f"--workdir={workdir}", *PRETRAIN_ARGS, f"--config.data.data_dir={data_dir}"],
                  processes=processes, devices=devices)
    return out


def _exported_encoder(workdir: Path) -> dict:
    """The exported encoder's arrays (its orbax state, restored as stored)."""
    import orbax.checkpoint as ocp

    from her2jax.models import port

    assert port.read_port(workdir / "encoder")["source"] == "her2jax-pretrain"
    return ocp.StandardCheckpointer().restore((workdir / "encoder" / port.STATE_DIR).absolute())


def _with_a_gradient(encoder: dict) -> dict:
    """The ViT's parameters less those whose gradient is zero in exact arithmetic: the key
    bias of every attention (it adds q.b to all of a query's logits, which the softmax
    ignores) and the final norm's bias (a shift of every feature, which the projector's
    BatchNorm removes). Their gradients are rounding noise, which Adam scales to full-size
    steps of either sign, so they differ between any two reduction orders."""
    width = encoder["norm"]["bias"].shape[0]
    encoder = {**encoder, "norm": {"scale": encoder["norm"]["scale"]}}
    blocks = {}
    for name, block in encoder["blocks"].items():
        bias = np.asarray(block["attn"]["qkv"]["bias"])
        query_value = np.concatenate([bias[:width], bias[2 * width:]])
        qkv = {**block["attn"]["qkv"], "bias": query_value}
        blocks[name] = {**block, "attn": {**block["attn"], "qkv": qkv}}
    return {**encoder, "blocks": blocks}


def test_two_processes_pretrain_like_one_process_with_as_many_devices(data_dir, tmp_path):
    """Keys gathered over the devices of both processes, the heads' BatchNorm synchronised
    across them, the views drawn per global example: the same run as one process with four
    devices, and one encoder written, by process 0."""
    multi, single = tmp_path / "two", tmp_path / "one"
    out = _pretrain(multi, data_dir, processes=2, devices=2)
    _pretrain(single, data_dir, processes=1, devices=4)
    assert out.count(f"pretrained {PRETRAIN_STEPS} steps") == 2, out[-3000:]
    a, b = _train_records(multi), _train_records(single)
    assert sorted(a) == list(range(1, PRETRAIN_STEPS + 1))
    for key in ("loss", "grad_norm", "momentum"):
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-5), key
    for step in range(1, PRETRAIN_STEPS + 1):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-4), step
    knn = [[r["knn_macro_auc"] for r in logger.read_metrics(w) if r["split"] == "val"]
           for w in (multi, single)]
    assert len(knn[0]) == 1 and knn[0] == pytest.approx(knn[1], abs=1e-6)
    # The exported encoder: written once, complete, equal to the one-process export.
    _assert_close(_with_a_gradient(_exported_encoder(multi)),
                  _with_a_gradient(_exported_encoder(single)), rtol=1e-3, atol=1e-5)
    assert not list(multi.rglob("*.tmp")), "a temporary file was left behind"
    events = list((multi / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, events
