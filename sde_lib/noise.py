"""Random draws keyed per example, so that a sample does not depend on its batch or process.

Samplers and losses draw their noise through a *noise source* with three methods,

    randn(shape, dtype, device), rand(shape, dtype, device), randint(high, shape, device),

where shape[0] is the batch. `TorchNoise` wraps a `torch.Generator` (one stream for the whole
batch: what a single process needs). `KeyedNoise` gives every row of the batch its own stream,
keyed by integer words such as (seed, global index): row i of every draw depends only on its key
and on how many draws came before, never on the other rows. This is what EDM does with one
generator per sample (Karras et al. 2022, `StackedRandomGenerator`), here without a Python loop
over the rows: each value is a counter-based hash of (key words, draw number, element index),
evaluated as a few integer tensor ops on the tensors' device, so it costs the same on a GPU as
one `torch.randn` and needs no host round trip.

The hash is a chain of 32-bit integer finalisers ("lowbias32": xorshift-multiply rounds with
full avalanche) carried in int64 tensors: every product is masked back to its low 32 bits, which
wrap-around multiplication computes exactly. Uniforms take 32 bits ((h + 1/2) / 2^32, never 0 or
1); normals come from two uniforms by the Box-Muller transform in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_MASK = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B  # lowbias32 multipliers
_GOLDEN = 0x9E3779B9  # separates the words of a key before they are mixed in


def _mix(h: torch.Tensor) -> torch.Tensor:
    """One 32-bit finaliser round on non-negative int64 values < 2^32 (elementwise)."""
    h = h ^ (h >> 16)
    h = (h * _M1) & _MASK
    h = h ^ (h >> 15)
    h = (h * _M2) & _MASK
    return h ^ (h >> 16)


def hash_words(words: Sequence[torch.Tensor | int]) -> torch.Tensor:
    """Hash a sequence of integer words (tensors broadcasting together, or ints) to 32 bits."""
    device = next((w.device for w in words if torch.is_tensor(w)), None)
    h = torch.zeros((), dtype=torch.int64, device=device)
    for w in words:
        w = torch.as_tensor(w, dtype=torch.int64, device=device)
        h = _mix(h ^ (((w & _MASK) + _GOLDEN) & _MASK))
        h = _mix(h ^ ((w >> 32) & _MASK))
    return h


def split_key(value: int) -> list[int]:
    """A Python integer of any size as 32-bit words (for seeds that are larger than 2^32)."""
    if value < 0:
        raise ValueError(f"a noise key must be >= 0, got {value}")
    words = [value & _MASK]
    value >>= 32
    while value:
        words.append(value & _MASK)
        value >>= 32
    return words


class TorchNoise:
    """The noise-source interface over one `torch.Generator` (None: torch's global generator)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def randn(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=dtype, device=device)

    def rand(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=self.generator, dtype=dtype, device=device)

    def randint(self, high: int, shape, device=None) -> torch.Tensor:
        return torch.randint(high, tuple(shape), generator=self.generator, device=device)


def _mix_int(h: int) -> int:
    """`_mix` on a Python integer in [0, 2^32)."""
    h ^= h >> 16
    h = (h * _M1) & _MASK
    h ^= h >> 15
    h = (h * _M2) & _MASK
    return h ^ (h >> 16)


class KeyedNoise:
    """Per-row random streams: row i of each draw is a function of keys[i] and the draw number.

    keys: (B, K) int64 tensor of K words per row (each in [0, 2^32)), e.g. (seed, global index);
    `for_indices(seed, indices)` builds it. A draw's shape must start with B. Draws are counted,
    so successive calls give independent values; two sources with the same keys and the same
    sequence of draws give the same numbers whatever their batch composition. Each (row, draw)
    stream is identified by 64 bits (two 32-bit row hashes), so streams do not collide in
    practice even over 10^9 rows x draws.
    """

    def __init__(self, keys: torch.Tensor) -> None:
        if keys.ndim != 2:
            raise ValueError(f"keys must be (B, K) words, got shape {tuple(keys.shape)}")
        words = list(keys.to(torch.int64).unbind(1))
        self._set_rows(hash_words([1, *words]), hash_words([2, *words]))

    def _set_rows(self, h1: torch.Tensor, h2: torch.Tensor) -> None:
        self._rows = torch.stack([h1, h2])  # two independent 32-bit hashes of each key: (2, B)
        self.draws = 0
        self._counters: dict = {}

    @classmethod
    def from_row_hashes(cls, h1: torch.Tensor, h2: torch.Tensor) -> KeyedNoise:
        """A source whose rows are given by two (B,) int64 tensors of 32-bit hashes (e.g. from
        `hash_words`), for callers that derive the keys of many batches cheaply."""
        out = cls.__new__(cls)
        out._set_rows(h1, h2)
        return out

    @classmethod
    def for_indices(cls, seed: int, indices: torch.Tensor, *words: int) -> KeyedNoise:
        """Rows keyed by (seed, *words, index) for the given global indices (B,)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        fixed = [torch.full_like(idx, w) for w in (*split_key(int(seed)), *words)]
        lo, hi = idx & _MASK, idx >> 32
        return cls(torch.stack([*fixed, lo, hi], dim=1))

    def derive(self, word: int) -> KeyedNoise:
        """A fresh source whose row keys are these rows' keys extended by `word` (one integer
        in [0, 2^32)): e.g. the noise of training step k from the rows' (seed, position) keys,
        at the cost of two finaliser rounds per row."""
        w1 = _mix_int((word * _GOLDEN + 0x2545F491) & _MASK)
        w2 = _mix_int(w1 ^ 0x68E31DA4)
        w = torch.tensor([[w1], [w2]], dtype=torch.int64, device=self._rows.device)
        out = KeyedNoise.__new__(KeyedNoise)
        out._rows, out.draws, out._counters = _mix(self._rows ^ w), 0, {}
        return out

    def __len__(self) -> int:
        return self._rows.shape[1]

    def _bits(self, shape, device, lanes: int) -> torch.Tensor:
        """(lanes, *shape) independent 32-bit values for this draw, as int64."""
        shape = tuple(shape)
        if not shape or shape[0] != len(self):
            raise ValueError(f"a keyed draw needs shape ({len(self)}, ...), got {shape}")
        device = torch.device(device) if device is not None else self._rows.device
        if self._rows.device != device:
            self._rows = self._rows.to(device)
        per_row = math.prod(shape[1:])
        counter = self._counters.get((per_row, lanes, device))
        if counter is None:  # element-and-lane counter, pre-multiplied: (lanes, 1, per_row)
            c = torch.arange(lanes * per_row, dtype=torch.int64, device=device)
            counter = ((c.view(per_row, lanes).t() + 1) * _GOLDEN & _MASK).unsqueeze(1)
            self._counters = {(per_row, lanes, device): counter}
        # (row, draw) streams are told apart by 64 bits (a, b); for a fixed stream the two
        # finaliser rounds are a bijection of the counter: distinct streams, distinct sequences
        d = _mix_int((self.draws * _GOLDEN + 0x632BE5AB) & _MASK)
        self.draws += 1
        a = (self._rows[0] ^ d).view(1, -1, 1)
        b = (self._rows[1] ^ _mix_int(d)).view(1, -1, 1)
        h = _mix(_mix(a ^ counter) ^ b)  # (lanes, B, per_row)
        return h.reshape(lanes, *shape)

    def rand(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        u = (self._bits(shape, device, 1)[0].double() + 0.5) * 2.0**-32
        return u.to(dtype)

    def randn(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        u = (self._bits(shape, device, 2).double() + 0.5) * 2.0**-32
        z = torch.sqrt(-2.0 * torch.log(u[0])) * torch.cos(2 * math.pi * u[1])
        return z.to(dtype)

    def randint(self, high: int, shape, device=None) -> torch.Tensor:
        u = (self._bits(shape, device, 1)[0].double() + 0.5) * 2.0**-32
        return (u * high).floor().long().clamp_max(high - 1)


def as_noise(generator) -> TorchNoise | KeyedNoise:
    """The noise source for a `generator` argument: a noise source itself, or a torch.Generator
    (or None) wrapped in `TorchNoise`."""
    if hasattr(generator, "randn") and hasattr(generator, "rand"):
        return generator
    return TorchNoise(generator)


def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise of x's shape, dtype and device from a generator or noise source."""
    return as_noise(generator).randn(x.shape, dtype=x.dtype, device=x.device)


__all__ = ["KeyedNoise", "TorchNoise", "as_noise", "hash_words", "randn_like", "split_key"]
