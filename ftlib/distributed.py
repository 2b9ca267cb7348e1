"""Multi-process (multi-host) start-up: one JAX process per host, all running the
same program. Cloud TPU pods, Slurm and Open MPI are detected by JAX itself
(`--multihost`); anywhere else, name the coordinator and this process's rank."""

from __future__ import annotations

from absl import flags

from ftlib.errors import FtlibError

_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join a multi-host run whose layout JAX detects (TPU pod, Slurm, MPI)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "HOST:PORT of process 0 for an explicit multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the explicit run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's rank in the explicit run.")


def initialize_from_flags() -> None:
    """Calls jax.distributed.initialize when the flags ask for a multi-process run;
    must run before any other JAX work."""
    if _COORDINATOR.value:
        if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
            raise FtlibError(
                f"--process_id={_PROCESS_ID.value} must be in [0, --num_processes="
                f"{_NUM_PROCESSES.value})"
            )
        initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _MULTIHOST.value:
        initialize()


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> None:
    import jax

    # CPU devices exchange collectives over gloo (TCP); accelerators use their own fabric.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
