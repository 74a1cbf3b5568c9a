"""One merge on many ranks of torch.distributed: which rank merges which tensors, and how ranks
exchange what they found so that every rank continues from the same values.

A merge under `torchrun` (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
SLURM's SLURM_PROCID/SLURM_NTASKS with MASTER_ADDR/MASTER_PORT), or inside a process group its
caller initialised, splits the plan's tensors into one contiguous run per rank, balanced by the
bytes of their inputs weighted by the method's work per byte (from the headers alone). A rank
reads and writes only its own tensors, in every pass.

Ranks exchange Python objects only (statistics, digests, what each wrote), through
`all_gather_object` on a gloo group: small and host-side, so they never need the GPU's NCCL. A
statistic is never all-reduced in floating point: every rank receives every tensor's part and
folds them all in the plan's order (engine/run.py), the very fold a single process does, so the
output has the same bits for every world size.

Every exchange also carries each rank's failure. A rank whose work raises joins the next
exchange with its message instead of a value; every rank then raises it, naming the rank, and
none takes part in another exchange, so all ranks stop together. A rank that dies (killed) makes
the others' next exchange fail within the process group's timeout (`--dist-timeout`).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from r2m_ext.errors import R2MError
from r2m_ext.plan import MergePlan, TensorPlan

Value = TypeVar("Value")

DEFAULT_DIST_TIMEOUT_S = 300.0


class RankFailed(R2MError):
    """Raised on every rank when one rank's work failed."""


class RankLost(RankFailed):
    """Raised where a rank stopped answering (killed, its machine gone, past the timeout). Like
    an interruption, it keeps what the ranks completed, for --resume."""


def _int_variable(environment: Mapping[str, str], name: str) -> int:
    try:
        return int(environment[name])
    except ValueError:
        value = environment[name]
        raise R2MError(f"environment variable {name}={value!r} is not an integer") from None


def launch_environment(environment: Mapping[str, str] = os.environ) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) that a launcher set, or None outside one: torchrun's (and
    Ray Train's, and hand-written launchers') RANK and WORLD_SIZE, else SLURM's task variables
    where MASTER_ADDR says where rank 0 listens."""
    if "RANK" in environment and "WORLD_SIZE" in environment:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in environment and "SLURM_NTASKS" in environment:
        if "MASTER_ADDR" not in environment:
            return None  # a SLURM job step that is not meant as a process group
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return None
    rank, world = (_int_variable(environment, name) for name in names[:2])
    local = _int_variable(environment, names[2]) if names[2] in environment else 0
    if not 0 <= rank < world:
        raise R2MError(f"{names[0]}={rank} is not a rank of {names[1]}={world}")
    return rank, world, local


@dataclass
class Ranks:
    """This process's place in the merge: rank `rank` of `world` (1: a merge on its own)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this machine, which share its memory (and GPUs)
    timeout_s: float = DEFAULT_DIST_TIMEOUT_S
    _group: Any = None  # the process group exchanges go through (None: the default group)
    _initialised_here: bool = False  # whether close() ends the process group
    _owner: dict[str, int] = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def owns(self, name: str) -> bool:
        return self.world == 1 or self._owner[name] == self.rank

    def owner(self, name: str) -> int:
        return self._owner.get(name, 0)

    def split(self, plan: MergePlan, cost: Callable[[TensorPlan], int]) -> None:
        """Gives each rank one contiguous run of the plan's tensors (so its reads and its share
        of the output shards stay together) of about 1/world of the total cost: a tensor goes to
        the rank whose share holds the middle of its cost. Integers only: every rank computes
        the same split."""
        costs = [max(0, int(cost(entry))) for entry in plan.tensors]
        total = sum(costs)
        before = 0
        for entry, size in zip(plan.tensors, costs, strict=True):
            middle_twice = 2 * before + size
            owner = middle_twice * self.world // (2 * total) if total else 0
            self._owner[entry.name] = min(self.world - 1, owner)
            before += size

    def exchange(self, work: Callable[[], Value]) -> list[Value]:
        """Runs `work` on this rank and returns every rank's result, in rank order. On one
        process that is [work()], exceptions passing as raised. On several, a failure of `work`
        on any rank raises RankFailed on every rank, with the lowest failing rank's message."""
        if self.world == 1:
            return [work()]
        try:
            mine = (None, work())
        except RankLost:
            raise  # the exchanges are broken: nobody to tell
        except RankFailed:
            raise  # every rank raised it at the same exchange: none is waiting for this one
        except (R2MError, OSError) as error:
            mine = (str(error), None)
        except Exception as error:  # a defect: keep its traceback on this rank's stderr
            traceback.print_exc(file=sys.stderr)
            mine = (f"{type(error).__name__}: {error}", None)
        gathered: list[Any] = [None] * self.world
        import torch.distributed as dist

        try:
            dist.all_gather_object(gathered, mine, group=self._group)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise RankLost(
                f"rank {self.rank}: another rank left the merge or did not answer within "
                f"--dist-timeout {self.timeout_s:g} s ({first_line}); complete shards are kept "
                "for --resume"
            ) from None
        failures = [(rank, message) for rank, (message, _) in enumerate(gathered) if message]
        if failures:
            rank, message = failures[0]
            also = f" (and {len(failures) - 1} other rank(s))" if len(failures) > 1 else ""
            raise RankFailed(f"rank {rank} of {self.world}{also}: {message}")
        return [value for _, value in gathered]

    def device_and_share(self, device: str) -> tuple[str, int]:
        """This rank's device for `device` ("cuda" becomes cuda:LOCAL_RANK, wrapping around
        where a machine has fewer GPUs than ranks), and how many ranks share its memory: a
        default budget is that memory's share of one rank."""
        if not self.distributed:
            return device, 1
        if str(device) != "cuda":
            return device, self.local_world if str(device) == "cpu" else 1
        import torch

        gpus = max(1, torch.cuda.device_count())
        return f"cuda:{self.local_rank % gpus}", -(-self.local_world // gpus)

    def describe(self) -> dict:
        return {"rank": self.rank, "host": socket.gethostname(), "local_rank": self.local_rank}

    def close(self) -> None:
        if self._initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._initialised_here = False


def join_ranks(device: str, timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> Ranks:
    """This process's Ranks: those of a process group already initialised, else of the
    launcher's environment (initialising the group: gloo, plus NCCL for a CUDA merge), else a
    merge on its own. `timeout_s` bounds how long a rank waits for the others at an exchange."""
    if not timeout_s > 0:
        raise R2MError(f"dist_timeout must be a positive number of seconds, got {timeout_s}")
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world == 1:
            return Ranks()
        rank = dist.get_rank()
        # The caller's group may be NCCL alone, which cannot carry host objects: exchanges get
        # a gloo group of their own (created by every rank, as new_group requires).
        group = dist.new_group(backend="gloo", timeout=timeout)
        local = int(os.environ.get("LOCAL_RANK", rank))
        return Ranks(rank, world, local, _local_world(os.environ), timeout_s, group)
    launched = launch_environment()
    if launched is None or launched[1] == 1:
        return Ranks()
    if not dist.is_available():
        raise R2MError("this torch was built without torch.distributed; run one process")
    rank, world, local = launched
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise R2MError(
                f"rank {rank} of {world}: {name} is not set; launch with torchrun, or set "
                "MASTER_ADDR and MASTER_PORT to where rank 0 listens"
            )
    backend = "cpu:gloo,cuda:nccl" if str(device).startswith("cuda") else "gloo"
    try:
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world, timeout=timeout
        )
    except (RuntimeError, ValueError) as error:
        raise R2MError(f"rank {rank} of {world}: cannot join the process group ({error})") from None
    local_world = _local_world(os.environ)
    return Ranks(rank, world, local, local_world, timeout_s, None, _initialised_here=True)


def _local_world(environment: Mapping[str, str]) -> int:
    """Ranks on this machine: torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per node, else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if name in environment:
            try:
                return max(1, int(environment[name].split("(")[0]))
            except ValueError:
                break
    return 1
