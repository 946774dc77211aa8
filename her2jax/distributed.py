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

A peer that dies is noticed by the coordination service: after ``heartbeat_timeout_s`` without
its heartbeat the survivors abort (SIGABRT, with a C++ stack trace). The launchers in
``launch/`` turn that into a message naming the task that died first.

On CPU, cross-process collectives need an implementation: gloo is selected (it only affects
the CPU backend, so it is harmless on GPU and TPU hosts).
"""

from __future__ import annotations

import dataclasses
import os

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


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> Launch | None:
    """Starts JAX's distributed runtime when this is a multi-process run (see the module doc).

    Call it once, first, before anything touches a JAX device. Returns the Launch used, or
    None when there is a single process (nothing is started).
    """
    launch = detect(coordinator_address, num_processes, process_id)
    if launch is None:
        return None
    if heartbeat_timeout_s < 1:
        raise Her2jaxError(f"heartbeat timeout must be >= 1 s, got {heartbeat_timeout_s}",
                           key="heartbeat_timeout_s")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address, num_processes=launch.num_processes,
        process_id=launch.process_id, initialization_timeout=INITIALIZATION_TIMEOUT_S,
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
