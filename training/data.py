"""Training batches that depend on (seed, step) only: the same global batch for any world size.

`BatchPlan` fixes, for every step, which examples form the global batch of `batch_size`:

- a finite training set is read in epochs, each a fresh permutation seeded by (seed, epoch), with
  no example repeated within an epoch; global batch k is positions [k B, (k + 1) B) of the
  concatenated epochs (DistributedSampler's semantics, without its per-world-size padding);
- an infinite law draws global batch k from a generator seeded by (seed, k).

Rank r of W takes positions [r B / W, (r + 1) B / W) of each global batch and splits them into
micro-batches of at most `batch_per_device` (gradient accumulation). Since every batch is a
function of (seed, step), a resumed run needs no data state and continues exactly, with any number
of processes. Per-example training noise is keyed by (seed, step, position in the global batch)
through `sde_lib.noise.KeyedNoise`, so the loss of an example does not depend on the rank that
computes it either.
"""

from __future__ import annotations

import hashlib
import math

import torch

from sde_lib import KeyedNoise

NOISE_STREAM = 0x7472  # key word separating training noise from other keyed streams


def derived_seed(*words: int) -> int:
    """A 63-bit seed for a torch.Generator from integer words (seed, epoch, ...)."""
    digest = hashlib.sha256(":".join(map(str, words)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BatchPlan:
    """Which examples and which noise keys make up each step's batch (see the module doc)."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        batch_per_device: int | None = None,
        random_flip: bool = False,
        labels: bool = False,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"training.batch_size={batch_size} is not divisible by the {world_size} "
                f"processes; use a multiple of {world_size}"
            )
        self.dataset, self.B, self.seed = dataset, batch_size, seed
        self.rank, self.world = rank, world_size
        self.local = batch_size // world_size
        self.micro = min(self.local, batch_per_device or self.local)
        self.random_flip = random_flip and dataset.kind == "images"
        # labels: every batch is (x, y), the labels of the same examples (for laws: the label
        # drawn with each point, e.g. its mixture component)
        self.labels = bool(labels)
        if self.labels and dataset.labels is None and dataset.law_labels is None:
            raise ValueError(f"data set {dataset.name!r} has no labels")
        self._epochs: dict[int, torch.Tensor] = {}
        self._base: dict[int, KeyedNoise] = {}

    @property
    def n_micro(self) -> int:
        return math.ceil(self.local / self.micro)

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(derived_seed(self.seed, "epoch", epoch))
            self._epochs = {e: p for e, p in self._epochs.items() if e >= epoch - 1}
            self._epochs[epoch] = torch.randperm(self.dataset.train.shape[0], generator=g)
        return self._epochs[epoch]

    def _keys(self, j: int, device) -> KeyedNoise:
        """Noise keys (seed, stream, global position) of micro-batch j of this rank, cached."""
        if j not in self._base:
            lo = self.rank * self.local + j * self.micro
            pos = torch.arange(lo, min(lo + self.micro, (self.rank + 1) * self.local))
            self._base[j] = KeyedNoise.for_indices(self.seed, pos.to(device), NOISE_STREAM)
        return self._base[j]

    def global_indices(self, step: int) -> torch.Tensor:
        """Training-set indices of global batch `step` (finite sets): (B,) int64."""
        n = self.dataset.train.shape[0]
        start = step * self.B
        pos = torch.arange(start, start + self.B)
        epochs = pos // n
        out = torch.empty(self.B, dtype=torch.int64)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[pos[sel] % n]
        return out

    def global_batch(self, step: int):
        """The whole global batch of `step` in model space, (B, *shape) on the CPU; with labels
        the pair (x, y: (B,) int64)."""
        if self.dataset.law is not None:
            g = torch.Generator().manual_seed(derived_seed(self.seed, "law", step))
            if self.labels:  # the same points as `law` draws, with their labels
                x, y = self.dataset.law_labels(self.B, g)
                return x, y.long()
            return self.dataset.law(self.B, g)
        idx = self.global_indices(step)
        if self.labels:
            return self.dataset.train[idx], self._train_labels(idx)
        return self.dataset.train[idx]

    def _train_labels(self, idx: torch.Tensor) -> torch.Tensor:
        dev = self.dataset.train.device  # the labels are moved where the data live, once
        if getattr(self, "_y", None) is None or self._y.device != dev:
            self._y = self.dataset.labels["train"].to(dev)
        return self._y[idx.to(dev)]

    def local_batch(self, step: int):
        """This rank's share of global batch `step`: (B / W, *shape), where the data live; with
        labels the pair (x, y)."""
        lo = self.rank * self.local
        if self.dataset.law is not None:
            out = self.global_batch(step)
            if self.labels:
                return out[0][lo : lo + self.local], out[1][lo : lo + self.local]
            return out[lo : lo + self.local]
        idx = self.global_indices(step)[lo : lo + self.local]
        if self.labels:
            return self.dataset.train[idx], self._train_labels(idx)
        return self.dataset.train[idx]

    def local_batches(self, start: int, stop: int, workers: int = 0, pin: bool = False):
        """`local_batch(step)` for step = start .. stop - 1, in order; with workers > 0 they are
        prepared ahead in background processes by a torch DataLoader (pinned if `pin`)."""
        if workers == 0:
            return (self.local_batch(k) for k in range(start, stop))
        loader = torch.utils.data.DataLoader(
            _Steps(self, start, stop), batch_size=None, num_workers=workers, pin_memory=pin
        )
        return iter(loader)

    def micro_batches(self, step: int, x: torch.Tensor, device: torch.device):
        """Split this rank's share x of global batch `step` into a list of (x0, noise)
        micro-batches, x0 on `device` and noise a KeyedNoise over the examples' positions; with
        labels x is the pair (x, y) and the micro-batches are (x0, noise, y0)."""
        out = []
        if self.labels:
            x, y = x
        for j, start in enumerate(range(0, self.local, self.micro)):
            noise = self._keys(j, device).derive(step & 0xFFFFFFFF)
            if step >> 32:  # steps past 2^32 extend the key by their high word
                noise = noise.derive(step >> 32)
            x0 = x[start : start + self.micro].to(device, non_blocking=True)
            if self.random_flip:  # horizontal flip, decided per example by its own key
                flip = noise.rand((x0.shape[0],), device=device) < 0.5
                x0 = torch.where(flip.view(-1, *[1] * (x0.ndim - 1)), x0.flip(-1), x0)
            if self.labels:
                out.append((x0, noise, y[start : start + self.micro].to(device, non_blocking=True)))
            else:
                out.append((x0, noise))
        return out


class _Steps(torch.utils.data.IterableDataset):
    """The local batches of steps start .. stop - 1; worker w of n makes steps start + w + k n,
    and the DataLoader takes them from its workers in turn, so they arrive in step order."""

    def __init__(self, plan: BatchPlan, start: int, stop: int) -> None:
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + w, self.stop, n):
            yield self.plan.local_batch(step)
