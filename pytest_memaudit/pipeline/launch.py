"""Where this process stands in a launch (torchrun, srun, or alone), read from the environment.

Kept apart from ``distributed`` so that the plugin's end-of-session hooks can ask for the rank
without importing torch: a pytest run that audits nothing must stay free.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import AuditError


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a launch: ``rank`` of ``size`` processes, ``local_rank`` of
    the ``local_size`` processes on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1


def launch_from_environment(environ: Mapping[str, str] | None = None) -> Launch:
    """The launch the environment describes: torchrun's variables (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), else those srun sets for a job step of several tasks
    (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, ``SLURM_STEP_TASKS_PER_NODE``),
    else one process."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        size = _integer(env, "WORLD_SIZE")
        rank = _integer(env, "RANK", 0)
        local_rank = _integer(env, "LOCAL_RANK", rank)
        local_size = _integer(env, "LOCAL_WORLD_SIZE", size)
    elif _integer(env, "SLURM_STEP_NUM_TASKS", 1) > 1:
        size = _integer(env, "SLURM_STEP_NUM_TASKS")
        rank = _integer(env, "SLURM_PROCID")
        local_rank = _integer(env, "SLURM_LOCALID", 0)
        tasks = env.get("SLURM_STEP_TASKS_PER_NODE", "1").split(",")[0]  # e.g. "8(x2)": 8 tasks on each of 2 nodes
        local_size = _integer({"tasks": tasks.split("(")[0]}, "tasks")
    else:
        return Launch()
    if not (0 <= rank < size and 0 <= local_rank < local_size <= size):
        raise AuditError(
            f"the launch's environment is inconsistent: rank {rank} of {size} processes, local rank "
            f"{local_rank} of {local_size}. Start the audit with torchrun, or set RANK, WORLD_SIZE, "
            "LOCAL_RANK and LOCAL_WORLD_SIZE for each process."
        )
    return Launch(rank, size, local_rank, local_size)


def launch_rank() -> int:
    """This process's rank in its launch (0 when it runs alone); reads the environment only."""
    try:
        return launch_from_environment().rank
    except AuditError:
        return 0


def _integer(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(str(value).strip())
    except ValueError:
        raise AuditError(f"environment variable {name}={value!r} is not a whole number; the launcher set it "
                         "wrongly") from None
