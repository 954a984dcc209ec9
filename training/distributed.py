"""torch.distributed set-up from torchrun's environment; a no-op for single-process runs."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from sde_lib.io import atomic_write


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # a gloo group for waiting on the other ranks' whole share of a job (sampling, likelihood):
    # its timeout is a day, since ranks may finish their shares far apart in time
    wait_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is available; use device=cpu")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device={name!r} is not known; allowed: auto, cpu, cuda")


def setup(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1).

    `timeout_s` bounds every collective: a rank that died or hangs makes the others fail with
    an error after at most that long instead of waiting for ever."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    wait = None
    if world > 1:
        wait = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(timeout_s, 86400.0)))
    return DistInfo(rank, world, local, dev, wait)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of x over the ranks (x itself in a single process); no host synchronisation."""
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x)
    return x


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of `obj` on every rank (e.g. the run folder: Hydra names it per process)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because a peer died, hung past dist_timeout_s or cut the link."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not isinstance(e, RuntimeError):
        return False
    marks = ("gloo", "NCCL", "Connection closed", "Connection reset", "timed out")
    return any(k in str(e) for k in marks)


def teardown(info: DistInfo) -> None:
    """Destroy the process group; called from a `finally`. When the block is ending on a peer's
    failure the group is left alone: destroying a group whose peer is gone can wait on it (NCCL's
    watchdog, gloo's pending work) until the launcher kills this rank, and the process is about to
    exit anyway (run.py prints its one line and leaves without running finalisers)."""
    if not (info.enabled and dist.is_initialized()):
        return
    failing = sys.exc_info()[1]
    if failing is not None and is_peer_failure(failing):
        return
    dist.destroy_process_group()


def my_items(n: int, info: DistInfo) -> list[int]:
    """The items of 0..n-1 that this rank handles: every world_size-th one, from its rank."""
    return list(range(info.rank, n, info.world_size))


def gather_to_main(mine: dict, info: DistInfo, folder) -> dict | None:
    """Merge each rank's {index: value} on rank 0 (None on the other ranks).

    Values may be tensors, numbers, strings and lists / dicts of them. Each rank writes its part
    to `folder`/rank_<r>.pt (atomically) and rank 0 reads them back with weights_only=True after
    a barrier, so large sample arrays never travel through the process group and no object is
    unpickled. The first barrier waits on `info.wait_group` (a day's timeout): the ranks' shares
    may take very different times (adaptive solvers); a rank that dies makes torchrun stop the
    others. Reading the parts back is bounded by the process group's own timeout.
    """
    if not info.enabled:
        return dict(mine)


    folder = Path(folder)
    atomic_write(folder / f"rank_{info.rank}.pt", lambda f: torch.save(mine, f))
    dist.barrier(group=info.wait_group)
    merged = None
    if info.is_main:
        merged = {}
        for r in range(info.world_size):
            path = folder / f"rank_{r}.pt"
            merged.update(torch.load(path, weights_only=True))
            path.unlink()
        try:
            folder.rmdir()
        except OSError:
            pass
    dist.barrier()
    return merged
