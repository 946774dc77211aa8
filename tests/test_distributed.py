"""Which GPUs each process of a multi-process run drives (her2jax.distributed.local_device_ids).

The rule is a pure function of the environment, tested here with the variables SLURM sets for
each layout; one real two-process run on loopback shows the choice reaching JAX.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from her2jax import distributed
from her2jax.errors import Her2jaxError

REPO = Path(__file__).resolve().parents[1]
SLURM = distributed.Launch("slurm", None, None, None)
EIGHT = "0,1,2,3,4,5,6,7"


def slurm_task(local_id: int, *, node: int = 0, tasks_per_node: str = "1(x2)",
               **extra: str) -> dict[str, str]:
    """What srun sets for task ``local_id`` on step node ``node`` (2 nodes unless told)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[01-02]",
            "SLURM_NTASKS": "16", "SLURM_PROCID": str(local_id), "SLURM_LOCALID": str(local_id),
            "SLURM_NODEID": str(node), "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, **extra}


@pytest.mark.parametrize("env, expected", [
    # --ntasks-per-node=1 --gpus-per-node=8: the one task drives the node's 8 GPUs (JAX's
    # SLURM detection alone would give it GPU 0 only).
    (slurm_task(0, node=1, CUDA_VISIBLE_DEVICES=EIGHT, SLURM_GPUS_ON_NODE="8"),
     list(range(8))),
    (slurm_task(0, SLURM_GPUS_ON_NODE="8"), list(range(8))),          # no CUDA_VISIBLE_DEVICES
    (slurm_task(0, SLURM_STEP_GPUS="0,1,2,3"), [0, 1, 2, 3]),
    ({**slurm_task(0, tasks_per_node=""), "SLURM_NTASKS_PER_NODE": "1",
      "CUDA_VISIBLE_DEVICES": EIGHT}, list(range(8))),
    (slurm_task(0, node=1, tasks_per_node="2,1", CUDA_VISIBLE_DEVICES="0,1,2,3"),
     [0, 1, 2, 3]),                                                   # the node with one task
    # --ntasks-per-node=8 --gpus-per-task=1, SLURM binding a GPU to each task: task 5 sees
    # only its GPU, as number 0 (JAX alone would ask for GPU 5, which it cannot see).
    (slurm_task(5, tasks_per_node="8(x2)", CUDA_VISIBLE_DEVICES="5", SLURM_GPUS_PER_TASK="1",
                SLURM_GPUS_ON_NODE="1"), [0]),
    (slurm_task(5, tasks_per_node="8(x2)", CUDA_VISIBLE_DEVICES="5"), [0]),   # --gpu-bind
    # --ntasks-per-node=8 --gpus-per-node=8, no binding: every task sees all 8, task 5 takes
    # GPU 5.
    (slurm_task(5, tasks_per_node="8(x2)", CUDA_VISIBLE_DEVICES=EIGHT,
                SLURM_GPUS_ON_NODE="8"), [5]),
    (slurm_task(5, tasks_per_node="8(x2)", CUDA_VISIBLE_DEVICES=EIGHT,
                SLURM_GPUS_PER_TASK="1"), [5]),                       # per-task, not bound
    # Two tasks a node with 4 GPUs each: shared view, or bound by --gpus-per-task=h100:4.
    (slurm_task(1, tasks_per_node="2(x2)", CUDA_VISIBLE_DEVICES=EIGHT), [4, 5, 6, 7]),
    (slurm_task(1, tasks_per_node="2(x2)", CUDA_VISIBLE_DEVICES="4,5,6,7",
                SLURM_GPUS_PER_TASK="h100:4"), [0, 1, 2, 3]),
    (slurm_task(1, tasks_per_node="2(x2)", CUDA_VISIBLE_DEVICES="4,5,6,7",
                SLURM_GPUS_ON_NODE="8"), [0, 1, 2, 3]),               # fewer than the node's
    # MIG or UUID entries count like numbers.
    (slurm_task(0, CUDA_VISIBLE_DEVICES="GPU-8f2c1a3b-0000-1111-2222-333344445555,"
                "GPU-9a2c1a3b-0000-1111-2222-333344445555"), [0, 1]),
    # Nothing to choose: a CPU job, a task count SLURM did not give, GPUs hidden.
    (slurm_task(0), None),
    (slurm_task(3, tasks_per_node="", CUDA_VISIBLE_DEVICES=EIGHT), None),
    (slurm_task(0, CUDA_VISIBLE_DEVICES=""), None),
], ids=["1 task/node x 8 GPUs", "1 task/node, SLURM_GPUS_ON_NODE", "1 task/node, STEP_GPUS",
        "1 task/node, NTASKS_PER_NODE", "uneven nodes", "8 tasks/node x 1 GPU, bound",
        "8 tasks/node, --gpu-bind", "8 tasks/node sharing 8 GPUs",
        "8 tasks/node, --gpus-per-task unbound", "2 tasks/node sharing 8 GPUs",
        "2 tasks/node x 4 GPUs, bound", "2 tasks/node x 4 GPUs, fewer than the node's",
        "UUIDs", "CPU job", "unknown task count", "GPUs hidden"])
def test_slurm_tasks_drive_their_gpus(env, expected):
    assert distributed.local_device_ids(SLURM, env) == expected


def test_an_explicit_choice_wins():
    env = slurm_task(0, CUDA_VISIBLE_DEVICES=EIGHT, JAX_LOCAL_DEVICE_IDS="2, 3")
    assert distributed.local_device_ids(SLURM, env) == [2, 3]
    assert distributed.local_device_ids(SLURM, env, requested=[6]) == [6]
    with pytest.raises(Her2jaxError, match=r"device_ids=\[1, 1\] must be distinct"):
        distributed.local_device_ids(SLURM, env, requested=[1, 1])
    # Outside SLURM too: JAX_LOCAL_DEVICE_IDS is read the same way.
    flags = distributed.Launch("flags", "h:1", 2, 0)
    assert distributed.local_device_ids(flags, {"JAX_LOCAL_DEVICE_IDS": "1"}) == [1]


@pytest.mark.parametrize("launch, env", [
    (None, slurm_task(0, CUDA_VISIBLE_DEVICES=EIGHT)),                    # one process
    (distributed.Launch("openmpi", None, None, None), slurm_task(0, CUDA_VISIBLE_DEVICES=EIGHT)),
    (distributed.Launch("flags", "h:1", 2, 0), {"CUDA_VISIBLE_DEVICES": EIGHT}),  # no SLURM
], ids=["single process", "Open MPI", "flags outside SLURM"])
def test_other_launches_are_left_to_jax(launch, env):
    assert distributed.local_device_ids(launch, env) is None


def test_flags_inside_a_slurm_task_still_get_the_node_gpus():
    # JAX's SLURM detection would still pin GPU SLURM_LOCALID when the three flags are given.
    flags = distributed.Launch("flags", "h:1", 2, 0)
    assert distributed.local_device_ids(flags, slurm_task(0, CUDA_VISIBLE_DEVICES=EIGHT)) == \
        list(range(8))


@pytest.mark.parametrize("env, message", [
    (slurm_task(1, tasks_per_node="3", CUDA_VISIBLE_DEVICES=EIGHT),
     "3 tasks on this node and each sees the same 8 GPUs (CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7)"),
    (slurm_task(0, JAX_LOCAL_DEVICE_IDS="0,gpu1"), "is not a comma-separated list"),
    (slurm_task(0, JAX_LOCAL_DEVICE_IDS="1,1"), "must be distinct GPU numbers"),
    (slurm_task(0, JAX_LOCAL_DEVICE_IDS="-1"), "must be distinct GPU numbers"),
], ids=["8 GPUs among 3 tasks", "not numbers", "duplicates", "negative"])
def test_impossible_choices_are_one_line_errors(env, message):
    with pytest.raises(Her2jaxError) as error:
        distributed.local_device_ids(SLURM, env)
    assert message in str(error.value) and "\n" not in str(error.value)


CHILD = """
import jax
from her2jax import distributed
launch = distributed.initialize(heartbeat_timeout_s=10)
print(launch.source, jax.process_count(), jax.config.values["jax_cuda_visible_devices"],
      flush=True)
jax.distributed.shutdown()
"""


def test_two_slurm_tasks_one_per_node_reach_jax_with_all_their_gpus(tmp_path):
    """Two real processes, each the one task of its node, started by JAX's SLURM detection on
    loopback: each asks JAX for the 4 GPUs it sees (CPU only here: the ids only go into
    ``jax_cuda_visible_devices``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_LOCAL", "JAX_NUM_PROCESSES",
                                 "JAX_PROCESS_ID", "OMPI_", "TPU_", "HER2JAX_"))}
    procs = []
    for task in range(2):
        env = {**base, **slurm_task(0, node=task), "SLURM_STEP_NODELIST": "localhost",
               "SLURM_NTASKS": "2", "SLURM_PROCID": str(task), "JAX_PLATFORMS": "cpu",
               "CUDA_VISIBLE_DEVICES": "0,1,2,3", "JAX_COORDINATOR_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(out.split())
    finally:
        for proc in procs:
            proc.kill()
    assert outputs == [["slurm", "2", "0,1,2,3"]] * 2
