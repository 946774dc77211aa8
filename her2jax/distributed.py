"""JAX's multi-controller runtime, started once and only when there is more than one process.

Every process of a run executes the same program; ``jax.distributed.initialize`` connects them
through JAX's coordination service, after which ``jax.devices()`` lists the devices of all
processes, the mesh spans them all and each process feeds only its rows of every global batch
(``pipeline.process_rows``). Nothing here coordinates anything itself.

When :func:`initialize` starts the runtime:

* ``--coordinator_address --num_processes --process_id`` given (all three; one or two of them
  is an error): exactly these. The Kubernetes JobSet and ``launch/local_multiprocess.sh`` use
  this form.
* none given, and the environment names a multi-process job: SLURM inside ``srun`` with
  ``SLURM_NTASKS > 1``, Open MPI's ``mpirun`` with ``OMPI_COMM_WORLD_SIZE > 1``, a Cloud TPU
  pod slice (``TPU_WORKER_HOSTNAMES`` lists several workers, or ``HER2JAX_DISTRIBUTED=auto``
  asks for JAX's own detection), or ``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES``
  and ``JAX_PROCESS_ID``. JAX's cluster detection fills in what the environment implies.
* otherwise: nothing (one process; the common case).

Which GPUs each process drives (:func:`local_device_ids`; JAX's own SLURM detection would give
every process the one GPU numbered ``SLURM_LOCALID``, idling 7 of 8 GPUs when one task runs
per node, and pointing past the only GPU a task sees when SLURM binds GPUs to tasks):

* ``initialize(device_ids=...)`` or ``JAX_LOCAL_DEVICE_IDS`` given: exactly these.
* a SLURM task (the variables JAX's SLURM detection reads are set), with ``V`` GPUs visible to
  it (entries of ``CUDA_VISIBLE_DEVICES``; without it ``SLURM_GPUS_ON_NODE``, then the
  entries of ``SLURM_STEP_GPUS``), ``T`` tasks of the step on its node
  (``SLURM_STEP_TASKS_PER_NODE`` at ``SLURM_NODEID``, else ``SLURM_NTASKS_PER_NODE``) and
  local index ``L = SLURM_LOCALID``:

  - ``T == 1``: all ``V`` GPUs (``--ntasks-per-node=1 --gpus-per-node=8``: 0..7);
  - the task sees only its own GPUs, because SLURM bound them to it: ``V`` equals
    ``SLURM_GPUS_PER_TASK``, or ``V < T``, or ``V`` is less than the node's step GPUs
    (``SLURM_GPUS_ON_NODE`` / ``SLURM_STEP_GPUS``): all ``V`` (``--gpus-per-task=1``: GPU 0,
    the one it sees);
  - otherwise every task sees the same ``V`` GPUs and takes its share, ``V / T`` of them
    from ``L * V / T`` (``--ntasks-per-node=8 --gpus-per-node=8``: GPU ``L``, as JAX would);
    ``V`` not a multiple of ``T`` is an error.

  No GPUs named (a CPU job), or the task count unknown: JAX's own choice.
* any other launch: JAX's own choice (all local devices, or one per process under Open MPI).

One layout reads the same as another and is shared wrongly: tasks bound to several GPUs each
by ``--gpu-bind`` alone (no ``--gpus-per-task``) where SLURM narrows ``SLURM_GPUS_ON_NODE``
to the task's own; use ``--gpus-per-task`` there, or set ``JAX_LOCAL_DEVICE_IDS``.

A peer that dies is noticed by the coordination service: after ``heartbeat_timeout_s`` without
its heartbeat the survivors abort (SIGABRT, with a C++ stack trace). The launchers in
``launch/`` turn that into a message naming the task that died first.

On CPU, cross-process collectives need an implementation: gloo is selected (it only affects
the CPU backend, so it is harmless on GPU and TPU hosts).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

from her2jax.errors import Her2jaxError

DEFAULT_HEARTBEAT_TIMEOUT_S = 30
# Generous: on a cluster the processes of one job start over a minute or two.
INITIALIZATION_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the run (``None`` fields: JAX detects them)."""

    source: str                      # "flags", "slurm", "openmpi", "tpu", "env"
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None


def _int_env(name: str, env) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise Her2jaxError(f"environment variable {name}={value!r} is not an integer",
                           key=name) from None


def detect(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, env=None) -> Launch | None:
    """How this process should join a multi-process run, or None for a single process.

    Args:
      coordinator_address: ``host:port`` of process 0's coordination service.
      num_processes: the number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      env: the environment to read (default ``os.environ``).

    Raises:
      Her2jaxError: only some of the three flags given, or values out of range.
    """
    env = os.environ if env is None else env
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    present = [name for name, value in given.items() if value not in (None, "")]
    if present:
        missing = [name for name in given if name not in present]
        if missing:
            raise Her2jaxError(f"--{' --'.join(present)} given without --{' --'.join(missing)}: "
                               "a multi-process run needs all three", key=missing[0])
        if ":" not in coordinator_address:
            raise Her2jaxError(f"--coordinator_address={coordinator_address!r} must be "
                               "host:port", key="coordinator_address")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise Her2jaxError(f"--process_id={process_id} must lie in [0, --num_processes="
                               f"{num_processes})", key="process_id")
        return Launch("flags", coordinator_address, num_processes, process_id)

    if env.get("JAX_COORDINATOR_ADDRESS"):
        count, index = _int_env("JAX_NUM_PROCESSES", env), _int_env("JAX_PROCESS_ID", env)
        if count is None or index is None:
            raise Her2jaxError("JAX_COORDINATOR_ADDRESS is set without JAX_NUM_PROCESSES and "
                               "JAX_PROCESS_ID", key="JAX_COORDINATOR_ADDRESS")
        return detect(env["JAX_COORDINATOR_ADDRESS"], count, index, env={}) if count > 1 \
            else None
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") is not None \
            and (_int_env("SLURM_NTASKS", env) or 1) > 1:
        return Launch("slurm", None, None, None)
    if (_int_env("OMPI_COMM_WORLD_SIZE", env) or 1) > 1:
        return Launch("openmpi", None, None, None)
    workers = [w for w in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if w.strip()]
    if len(workers) > 1 or env.get("HER2JAX_DISTRIBUTED", "").lower() == "auto":
        return Launch("tpu" if workers else "auto", None, None, None)
    return None


# ----------------------------------------------------------------------------- GPUs

# What JAX's SLURM detection needs (jax._src.clusters.slurm_cluster): where it would pick one
# GPU per process.
_SLURM_TASK_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")
_GPU_ENTRY = re.compile(r"^(\d+|GPU-[0-9a-fA-F-]+|MIG-[\w/-]+)$")


def local_device_ids(launch: Launch | None, env=None, *,
                     requested: Sequence[int] | None = None) -> list[int] | None:
    """The GPUs this process drives, as ordinals among those it sees, or None for JAX's choice.

    Args:
      launch: what :func:`detect` returned.
      env: the environment to read (default ``os.environ``).
      requested: ids asked for explicitly (they win, like ``JAX_LOCAL_DEVICE_IDS``).

    Returns:
      ``local_device_ids`` for ``jax.distributed.initialize`` (the rule is in the module doc).

    Raises:
      Her2jaxError: ``JAX_LOCAL_DEVICE_IDS`` is not a list of ids, or a SLURM node's GPUs do
        not divide among its tasks.
    """
    env = os.environ if env is None else env
    if requested is not None:
        return _check_ids(list(requested), "device_ids")
    text = env.get("JAX_LOCAL_DEVICE_IDS", "").strip()
    if text:
        try:
            ids = [int(x) for x in text.split(",")]
        except ValueError:
            raise Her2jaxError(f"JAX_LOCAL_DEVICE_IDS={text!r} is not a comma-separated list "
                               "of GPU numbers", key="JAX_LOCAL_DEVICE_IDS") from None
        return _check_ids(ids, "JAX_LOCAL_DEVICE_IDS")
    if launch is None or launch.source in ("openmpi", "tpu") \
            or not all(env.get(name, "").strip() for name in _SLURM_TASK_VARS):
        return None
    return _slurm_gpus(env)


def _check_ids(ids: list[int], key: str) -> list[int]:
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise Her2jaxError(f"{key}={ids} must be distinct GPU numbers >= 0", key=key)
    return ids


def _slurm_gpus(env) -> list[int] | None:
    visible, shown = _visible_gpus(env)
    tasks = _tasks_on_node(env)
    local = _int_env("SLURM_LOCALID", env)
    if not visible or tasks is None or local is None or not 0 <= local < tasks:
        return None   # no GPUs named (a CPU job), or a layout this rule cannot read
    everything = list(range(visible))
    if tasks == 1:
        return everything
    per_task = _count(env.get("SLURM_GPUS_PER_TASK", ""))
    on_node = _count(env.get("SLURM_GPUS_ON_NODE", "")) or len(_entries(env, "SLURM_STEP_GPUS"))
    if visible == per_task or visible < tasks or visible < on_node:
        return everything   # SLURM bound these GPUs to this task: they are its own
    if visible % tasks:
        raise Her2jaxError(
            f"SLURM runs {tasks} tasks on this node and each sees the same {visible} GPUs "
            f"({shown}), which do not divide among them: ask for a multiple of the tasks "
            "(--gpus-per-node), bind GPUs to tasks (--gpus-per-task), or set "
            "JAX_LOCAL_DEVICE_IDS", key="SLURM_STEP_TASKS_PER_NODE")
    share = visible // tasks
    return everything[local * share:(local + 1) * share]


def _entries(env, name: str) -> list[str]:
    return [x.strip() for x in env.get(name, "").split(",") if x.strip()]


def _count(value: str) -> int:
    """A SLURM GPU count (``8``, ``h100:8``, ``8(S:0-1)``, ``a100:2,v100:1``); 0 when absent
    or unreadable."""
    total = 0
    for part in value.split(","):
        match = re.fullmatch(r"\s*(?:[\w.-]+:)?(\d+)(?:\(.*\))?\s*", part)
        if not match:
            return 0
        total += int(match.group(1))
    return total


def _visible_gpus(env) -> tuple[int, str]:
    """How many GPUs this task sees, and where that was read."""
    if "CUDA_VISIBLE_DEVICES" in env:
        entries = _entries(env, "CUDA_VISIBLE_DEVICES")
        if all(_GPU_ENTRY.match(x) for x in entries):
            return len(entries), f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}"
    if _count(env.get("SLURM_GPUS_ON_NODE", "")):
        return (_count(env["SLURM_GPUS_ON_NODE"]),
                f"SLURM_GPUS_ON_NODE={env['SLURM_GPUS_ON_NODE']}")
    gpus = _entries(env, "SLURM_STEP_GPUS")
    return len(gpus), f"SLURM_STEP_GPUS={env.get('SLURM_STEP_GPUS', '')}"


def _tasks_on_node(env) -> int | None:
    """Tasks of this job step on this task's node."""
    layout = env.get("SLURM_STEP_TASKS_PER_NODE", "").strip()
    if layout:
        counts = []
        for part in layout.split(","):
            match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
            if not match:
                counts = []
                break
            counts += [int(match.group(1))] * int(match.group(2) or 1)
        node = _int_env("SLURM_NODEID", env)
        if node is not None and 0 <= node < len(counts):
            return counts[node]
        if counts and len(set(counts)) == 1:
            return counts[0]
    return _int_env("SLURM_NTASKS_PER_NODE", env)


# ----------------------------------------------------------------------------- the runtime


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
               device_ids: Sequence[int] | None = None) -> Launch | None:
    """Starts JAX's distributed runtime when this is a multi-process run (see the module doc).

    Call it once, first, before anything touches a JAX device. Returns the Launch used, or
    None when there is a single process (nothing is started).

    Args:
      coordinator_address, num_processes, process_id: as for :func:`detect`.
      heartbeat_timeout_s: how long the coordination service waits for a silent peer.
      device_ids: the GPUs this process drives (default: :func:`local_device_ids`).
    """
    launch = detect(coordinator_address, num_processes, process_id)
    if launch is None:
        return None
    if heartbeat_timeout_s < 1:
        raise Her2jaxError(f"heartbeat timeout must be >= 1 s, got {heartbeat_timeout_s}",
                           key="heartbeat_timeout_s")
    gpus = local_device_ids(launch, requested=device_ids)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address, num_processes=launch.num_processes,
        process_id=launch.process_id, local_device_ids=gpus,
        initialization_timeout=INITIALIZATION_TIMEOUT_S,
        heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    return launch


def process_count() -> int:
    """The number of processes of the run (1 before or without :func:`initialize`)."""
    import jax

    return jax.process_count()


def is_main_process() -> bool:
    """Whether this process writes the run's logs, reports and other non-orbax files."""
    import jax

    return jax.process_index() == 0
