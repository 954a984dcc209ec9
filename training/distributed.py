"""torch.distributed set-up from torchrun's environment; a no-op for single-process runs.

Ranks hand each other data through the process group only (`gather_to_main`, `share_from_main`,
`broadcast_object`), never through files, so a multi-node run needs no shared file system: each
machine may have its own outputs_root on its own disk. Rank 0 finds the checkpoint and writes the
run's outputs; the other ranks read none of its files and write only their own caches (mode=nll)
under their own outputs_root. The tests simulate machines that share nothing with one torchrun
and a per-rank root: `outputs_root=/some/base/rank${oc.env:RANK,0}`.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


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


# The most bytes one message between ranks carries: a sample set or a checkpoint travels in
# pieces of at most this size, so no collective needs a buffer (on the GPU, under NCCL) as large
# as the whole set, and a transport's own per-message limits are never reached.
CHUNK_BYTES = 64 * 2**20


def _encode(obj) -> torch.Tensor:
    """obj as a flat uint8 CPU tensor (torch.save's format): tensors, numbers, strings, None and
    lists / tuples / dicts of them, read back by `_decode` with the weights-only loader, so
    nothing a peer sends is unpickled as arbitrary Python objects."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)


def _decode(data: torch.Tensor):
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)


def _wire_device(info: DistInfo) -> torch.device:
    """Where a tensor must be to travel through the default group: NCCL moves CUDA tensors
    only, gloo CPU ones."""
    return info.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _pieces(n: int, chunk_bytes: int):
    """The (start, end) byte ranges of n bytes in pieces of at most chunk_bytes."""
    return ((lo, min(lo + chunk_bytes, n)) for lo in range(0, n, chunk_bytes))


def _send_bytes(data: torch.Tensor, dst: int, info: DistInfo, chunk_bytes: int) -> None:
    wire = _wire_device(info)
    for lo, hi in _pieces(data.numel(), chunk_bytes):
        dist.send(data[lo:hi].to(wire), dst=dst)


def _recv_bytes(n: int, src: int, info: DistInfo, chunk_bytes: int) -> torch.Tensor:
    """n bytes from rank src, sent by `_send_bytes`, as a uint8 CPU tensor."""
    out = torch.empty(n, dtype=torch.uint8)
    wire = _wire_device(info)
    for lo, hi in _pieces(n, chunk_bytes):
        if wire.type == "cpu":  # straight into place (a slice of a flat tensor is contiguous)
            dist.recv(out[lo:hi], src=src)
        else:
            piece = torch.empty(hi - lo, dtype=torch.uint8, device=wire)
            dist.recv(piece, src=src)
            out[lo:hi].copy_(piece)
    return out


def gather_to_main(mine: dict, info: DistInfo, chunk_bytes: int = CHUNK_BYTES) -> dict | None:
    """Merge each rank's {index: value} on rank 0 (None on the other ranks).

    Values may be tensors, numbers, strings, None and lists / dicts of them. They travel
    through the process group, not through files, so ranks on machines that share no file
    system can take part: each rank's share is serialised (`_encode`), its size is all-gathered
    and the bytes go to rank 0 in messages of at most `chunk_bytes`, so a share of any size
    never needs one buffer of its size on the wire (or on the GPU under NCCL). Shares may have
    different sizes. Rank 0 receives them one rank after another, so it holds at most one
    other rank's share in serialised form at a time.

    The size exchange waits on `info.wait_group` (a day's timeout): the ranks' shares may take
    very different times (adaptive solvers); the transfers after it are bounded by the process
    group's own timeout. A rank that dies makes the others fail (torchrun stops them).
    """
    if not info.enabled:
        return dict(mine)
    data = None if info.is_main else _encode(mine)
    sizes = torch.zeros(info.world_size, dtype=torch.int64)
    sizes[info.rank] = 0 if data is None else data.numel()
    dist.all_reduce(sizes, group=info.wait_group)  # every rank's size; waits for the slowest
    if not info.is_main:
        _send_bytes(data, 0, info, chunk_bytes)
        return None
    merged = dict(mine)
    for r in range(1, info.world_size):
        merged.update(_decode(_recv_bytes(int(sizes[r]), r, info, chunk_bytes)))
    return merged


def share_from_main(
    compute, info: DistInfo, error: type[Exception] = RuntimeError, chunk_bytes: int = CHUNK_BYTES
):
    """compute() run on rank 0 only, and its result on every rank.

    For what one rank finds or computes and all need: the checkpoint (rank 0 looks it up under
    its own outputs_root and the others receive its contents, so other machines need no copy
    of the file), or a schedule fitted to the model. The result may be as large as a checkpoint:
    it is serialised like `gather_to_main`'s shares and broadcast in pieces of at most
    `chunk_bytes`. An exception of type `error` raised by compute() on rank 0 is raised there and,
    with the same message, on every other rank, so a user error ends every rank the same way
    instead of leaving the others waiting. The first broadcast waits on `info.wait_group` (a
    day's timeout), since compute() may take long (fitting a schedule)."""
    if not info.enabled:
        return compute()
    failure, data, value = None, None, None
    if info.is_main:
        try:
            value = compute()
            data = _encode(("ok", value))
        except error as e:
            failure = e
            data = _encode(("error", str(e)))
    size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64)
    dist.broadcast(size, src=0, group=info.wait_group)  # the others wait here for compute()
    n, wire = int(size), _wire_device(info)
    out = data if info.is_main else torch.empty(n, dtype=torch.uint8)
    for lo, hi in _pieces(n, chunk_bytes):
        if info.is_main:
            dist.broadcast(out[lo:hi].to(wire), src=0)
        else:
            piece = torch.empty(hi - lo, dtype=torch.uint8, device=wire)
            dist.broadcast(piece, src=0)
            out[lo:hi].copy_(piece)
    if info.is_main:
        if failure is not None:
            raise failure
        return value
    status, value = _decode(out)
    if status == "error":
        raise error(value)
    return value
