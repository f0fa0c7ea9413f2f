"""One audit over several processes: the launch, the process group, and the collectives.

A launcher starts one process per device: ``torchrun`` (one machine or several), ``srun`` under
Slurm, or anything that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``. Each process audits its shard of the data points; the
accumulator states are then merged with collectives (``World.merge_states``) so that every
process holds the audit's whole state. Device tensors go over the default process group (NCCL
for CUDA, gloo for the CPU); small messages (agreement, progress, the median's counts) go over a
gloo group of their own. A process that fails is named to the others: setup failures are shared
(``World.agree``) so that every process stops with the same error, and before the merge every
process waits at most ``timeout_s`` for the others (``World.wait_for_all``). A process interrupted
midway (torchrun sends SIGTERM to every process when one fails) asks whether the others are still
there, and names those that are gone (``World.after_interrupt``).

With one process every collective is the identity: ``run_audit`` has one code path.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..errors import AuditError
from ..metric.unitmem import NO_INDEX, LayerState, merge_top, index_of, tie_order
from .launch import Launch, launch_from_environment
from .signals import ignore_terminate

DEFAULT_TIMEOUT_S = 1800  # how long a process waits for the others at a collective
# How long an interrupted process waits for the others' answer: a process that is gone has closed its
# connections and is found at once; this only bounds the wait for live ones (launchers send SIGKILL
# 30 s after SIGTERM: torchrun, Slurm's default KillWait).
INTERRUPT_PROBE_S = 5.0
PROBE_TAG = 0x6D61  # the tag of the interrupted processes' exchange
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


class World:
    """The processes of one audit. ``World()`` is a single process, with identity collectives."""

    def __init__(self, launch: Launch = Launch(), timeout_s: float = DEFAULT_TIMEOUT_S,
                 control: Any = None, owns_group: bool = False):
        self.launch = launch
        self.timeout_s = timeout_s
        self.control = control  # the gloo group for CPU-side messages
        self.owns_group = owns_group  # this World started the process group and ends it

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def size(self) -> int:
        return self.launch.size

    def backend(self, device: torch.device) -> str | None:
        """The backend ``device``'s tensors are merged over; None for one process."""
        if self.size == 1:
            return None
        return "nccl" if device.type == "cuda" else "gloo"

    def shard(self, n: int) -> range:
        """This process's data points: a contiguous block of positions (block sizes differ by one
        at most). Fixed by ``n`` and the launch, not by timing."""
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    # --- messages ------------------------------------------------------------------------------

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if self.size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.size
        self._collective(what, dist.all_gather_object, gathered, obj, group=self.control)
        return gathered

    def broadcast_object(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj``, on every process."""
        if self.size == 1:
            return obj
        box = [obj]
        self._collective(what, dist.broadcast_object_list, box, src=0, group=self.control)
        return box[0]

    def agree(self, problem: BaseException | None, what: str) -> None:
        """Stop every process if any process met a problem while ``what``: the process that met
        it raises it, the others an AuditError that names the process and quotes it."""
        reports = self.all_gather_object(None if problem is None else _describe(problem), what)
        if problem is not None:
            raise problem
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if failed:
            ignore_terminate()  # every process stops: a launcher's SIGTERM must not cut the message short
            listed = "; ".join(f"process {rank}: {report}" for rank, report in failed[:4])
            more = f" (and {len(failed) - 4} more)" if len(failed) > 4 else ""
            raise AuditError(f"the audit stopped on every process: {what}, {listed}{more}")

    def agree_on(self, facts: dict[str, Any], what: str) -> None:
        """Every process must see the same ``facts`` (name -> value): an AuditError on every
        process names the facts that differ and the processes that differ from process 0."""
        everyone = self.all_gather_object(facts, what)
        differ = []
        for name, value in everyone[0].items():
            odd = [rank for rank, theirs in enumerate(everyone) if theirs.get(name) != value]
            if odd:
                theirs = everyone[odd[0]].get(name)
                if isinstance(value, dict) and isinstance(theirs, dict):  # name the entries that differ
                    keys = [key for key in dict.fromkeys([*value, *theirs]) if value.get(key) != theirs.get(key)]
                    value, theirs = ({key: side.get(key) for key in keys} for side in (value, theirs))
                more = f"; {len(odd) - 1} more processes differ" if len(odd) > 1 else ""
                differ.append(f"{name} (process 0: {_short(value)}; process {odd[0]}: {_short(theirs)}{more})")
        if differ:
            raise AuditError(
                f"the processes of this audit disagree on {what}: {'; '.join(differ)}. Every process must audit the "
                "same model, data and settings: give them the same options, files and folders (a shared file system)."
            )

    def check_devices(self, device: torch.device) -> None:
        """An AuditError on every process if two processes of one machine use the same GPU."""
        owners: dict[tuple[str, str], int] = {}
        for rank, identity in enumerate(self.all_gather_object(device_identity(device), "the devices")):
            if identity is None:
                continue
            if identity in owners:
                raise AuditError(
                    f"processes {owners[identity]} and {rank} both use GPU {identity[1]} on {identity[0]}: each process "
                    "needs a GPU of its own. Start at most one process per GPU (torchrun --nproc_per_node = GPUs per "
                    "machine), and give each its own GPU (--memaudit-device cuda, or one visible GPU per process)."
                )
            owners[identity] = rank

    def wait_for_all(self, step: str) -> None:
        """Wait up to ``timeout_s`` for every process to reach ``step``; an AuditError names those that
        did not (they failed or hang: see their own output)."""
        if self.size == 1:
            return
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self._collective(step, dist.monitored_barrier, group=self.control, timeout=timeout, wait_all_ranks=True)

    def after_interrupt(self) -> None:
        """This process was interrupted (SIGTERM or Ctrl-C) while the audit ran. Launchers stop every
        process with SIGTERM when one fails (torchrun does), so exchange a word with every other
        process, for at most ``INTERRUPT_PROBE_S``: those whose connection fails before then are gone,
        and the error names them. If every process answers, or some do not answer in time (alive and
        busy, or not interrupted), return: the interrupt stands."""
        if self.size == 1:
            return
        deadline = time.monotonic() + INTERRUPT_PROBE_S
        gone: dict[int, str] = {}
        exchanges = []
        for peer in (peer for peer in range(self.size) if peer != self.rank):
            try:
                exchanges += [(peer, talk(torch.zeros(1), peer, group=self.control, tag=PROBE_TAG))
                              for talk in (dist.isend, dist.irecv)]
            except (RuntimeError, ValueError) as exc:
                gone.setdefault(peer, str(exc))
        for peer, exchange in exchanges:
            try:
                exchange.wait(datetime.timedelta(seconds=max(0.0, deadline - time.monotonic())))
            except (RuntimeError, ValueError) as exc:
                if time.monotonic() < deadline - 0.1 * INTERRUPT_PROBE_S:  # its connection failed: not a timeout
                    gone.setdefault(peer, str(exc))
        if gone:
            ranks = sorted(gone)
            who = f"processes {', '.join(map(str, ranks))} are" if len(ranks) > 1 else f"process {ranks[0]} is"
            raise self._lost(f"the audit ran: {who} gone (and this process was then stopped by a signal, as "
                             "launchers stop every process when one fails)", gone[ranks[0]],
                             f"it asked them for {INTERRUPT_PROBE_S:g} s")

    # --- tensors -------------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        """In place, over every process: ``op`` is sum, max or min (a ``selection.AllReduce``)."""
        if self.size == 1:
            return
        group = self.control if tensor.device.type == "cpu" else None
        self._collective(f"an all-reduce ({op})", dist.all_reduce, tensor, op=getattr(dist.ReduceOp, _OPS[op]),
                         group=group)

    def merge_states(self, states: Sequence[LayerState]) -> None:
        """Make every process's ``states`` the merge of all processes' (the same layers in the same
        order everywhere): counts and sums add, maxima and their argmax (ties by ``tie_order``), the top-k of every process. Stored values stay where they are: each
        process keeps its own rows, and medians are computed over all of them."""
        if self.size == 1:
            return
        self._reduce_flat([state.counts for state in states], "sum")
        self._reduce_flat([state.sums for state in states], "sum")
        own_maxima = [state.maxima.clone() for state in states]
        self._reduce_flat([state.maxima for state in states], "max")
        for state, own in zip(states, own_maxima):
            state.argmax.copy_(torch.where(own == state.maxima, tie_order(state.argmax), NO_INDEX))
        self._reduce_flat([state.argmax for state in states], "min")
        for state in states:
            state.argmax.copy_(index_of(state.argmax))
        top_values = self._gather_flat([state.top_values for state in states])
        top_index = self._gather_flat([state.top_index for state in states])
        for i, state in enumerate(states):
            state.top_values.copy_(top_values[0][i])
            state.top_index.copy_(top_index[0][i])
            for rank in range(1, self.size):
                for code in range(state.top_values.shape[0]):
                    merge_top(state.top_values[code], state.top_index[code], top_values[rank][i][code],
                               top_index[rank][i][code])
            if state.values is not None:
                state.values.all_reduce = self.all_reduce

    def _reduce_flat(self, tensors: list[torch.Tensor], op: str) -> None:
        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        self.all_reduce(flat, op)
        for tensor, part in zip(tensors, flat.split([tensor.numel() for tensor in tensors])):
            tensor.copy_(part.view_as(tensor))

    def _gather_flat(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Every process's ``tensors``: [rank][i]."""
        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        parts = [torch.empty_like(flat) for _ in range(self.size)]
        group = self.control if flat.device.type == "cpu" else None
        self._collective("gathering the top-k", dist.all_gather, parts, flat, group=group)
        sizes = [tensor.numel() for tensor in tensors]
        return [[piece.view_as(tensor) for piece, tensor in zip(part.split(sizes), tensors)] for part in parts]

    def _collective(self, what: str, call, *args, **kwargs) -> None:
        try:
            call(*args, **kwargs)
        except (RuntimeError, ValueError) as exc:  # gloo and NCCL failures, timeouts
            raise self._lost(what, exc, f"it waited up to {self.timeout_s:g} s, --memaudit-dist-timeout") from None

    def _lost(self, what: str, exc: BaseException | str, waited: str) -> AuditError:
        """The error of a process that lost the others while ``what``. It ends this process, so a
        launcher's SIGTERM (sent to every process when one fails) is ignored from now on."""
        ignore_terminate()
        return AuditError(
            f"process {self.rank} lost the other processes while {what}: {str(exc).strip()}. Another process "
            f"failed or stopped answering ({waited}): its own output says why."
        )

    def close(self) -> None:
        """End the process group if this World started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def join(timeout_s: float = DEFAULT_TIMEOUT_S, environ: Mapping[str, str] | None = None) -> World:
    """The World of this process: one process, or the launch's processes in a process group
    (started here unless the caller started one; gloo on the CPU, NCCL for CUDA tensors)."""
    launch = launch_from_environment(environ)
    if launch.size == 1:
        return World(launch, timeout_s)
    if not dist.is_available():
        raise AuditError("this PyTorch build has no torch.distributed; audit with one process, or install a build with it")
    timeout = datetime.timedelta(seconds=timeout_s)
    owns = not dist.is_initialized()
    if owns:
        env = os.environ if environ is None else environ
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise AuditError(
                f"{' and '.join(missing)} not set: the processes of a launch of {launch.size} find each other through "
                "them. torchrun sets them; under srun, export MASTER_ADDR=<first node's host name> and "
                "MASTER_PORT=<a free port> before srun (docs/full-scale.md: Auditing the full training set)."
            )
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        try:
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=launch.rank,
                                    world_size=launch.size, timeout=timeout)
        except (RuntimeError, ValueError) as exc:
            raise AuditError(f"process {launch.rank} of {launch.size} could not join the others: {exc}") from None
    elif dist.get_world_size() != launch.size or dist.get_rank() != launch.rank:
        raise AuditError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match the launch's "
            f"environment (rank {launch.rank} of {launch.size})"
        )
    control = dist.new_group(backend="gloo", timeout=timeout)
    return World(launch, timeout_s, control, owns)


def device_identity(device: torch.device) -> tuple[str, str] | None:
    """(host, GPU UUID) of a CUDA device, to find processes that share one; None on the CPU."""
    if device.type != "cuda":
        return None
    return socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid)


def _describe(problem: BaseException) -> str:
    return str(problem) if isinstance(problem, AuditError) else f"{type(problem).__name__}: {problem}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
