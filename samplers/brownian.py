"""Brownian paths keyed per sample: the same path for a sample whatever its batch, and the same
path at any step count, so that refining the steps of a stochastic sampler refines one path
(what strong convergence is measured on; k-diffusion's BrownianTreeNoiseSampler does this with
torchsde for a whole batch, issue k-diffusion#25).

W(u), u in [0, 1], W(0) = 0, is built by Levy's construction: the value at the midpoint m of a
dyadic interval [a, b] given W(a), W(b) is (W(a) + W(b)) / 2 + sqrt((b - a) / 4) Z, where the
standard normal Z of node (a, b) is keyed by the sample and the node's position in the tree, so
any set of queries sees one path. A query between nodes descends until the interval is shorter
than `rel_tol` times the query point (grids of noise levels are geometric: a step near u is a
fixed fraction of u) or `max_depth` is reached, then interpolates linearly (the bridge's mean):
exact at dyadic points, and elsewhere off by a bridge of variance <= the final interval's length
/ 4. Node values are cached per path; the memory grows with the queries times the tree depth,
so paths suit point data and small images.
"""

from __future__ import annotations

import math

import torch

from sde_lib import KeyedNoise, randn_like


class KeyedBrownian:
    """W(u) for u in [0, 1] per row of `noise` (a KeyedNoise with one row per sample), each value
    of shape (B, *shape[1:])."""

    def __init__(
        self,
        noise: KeyedNoise,
        shape: tuple[int, ...],
        *,
        dtype: torch.dtype = torch.float64,
        device=None,
        max_depth: int = 52,
        rel_tol: float = 1e-7,
    ) -> None:
        if not isinstance(noise, KeyedNoise):
            raise ValueError(
                "brownian=true needs per-sample keyed noise (KeyedNoise, as run.py passes): a "
                "torch.Generator cannot key a path by the sample"
            )
        self.noise, self.shape, self.dtype, self.device = noise, tuple(shape), dtype, device
        self.max_depth, self.rel_tol = max_depth, rel_tol
        self._z: dict[tuple[int, int], torch.Tensor] = {}
        zero = torch.zeros(self.shape, dtype=dtype, device=device)
        # W(1) ~ N(0, 1): the root's normal
        self._values = {
            (0, 0): zero,
            (0, 1): self._normal(0, 1),
        }  # (depth, index) -> W(index / 2^depth)

    def _normal(self, depth: int, index: int) -> torch.Tensor:
        """The standard normal of tree node (depth, index), keyed by the sample and the node."""
        key = (depth, index)
        if key not in self._z:
            word = (depth * 0x9E3779B1 + index * 0x85EBCA77 + 0x2545F491) & 0xFFFFFFFF
            self._z[key] = self.noise.derive(word).randn(self.shape, dtype=self.dtype,
                                                          device=self.device)  # fmt: skip
        return self._z[key]

    def _value(self, depth: int, index: int) -> torch.Tensor:
        """W(index / 2^depth) at a dyadic point (index reduced: odd, or 0 / 2^depth)."""
        while depth > 0 and index % 2 == 0:
            depth, index = depth - 1, index // 2
        key = (depth, index)
        if key not in self._values:
            left = self._value(depth, index - 1)
            right = self._value(depth, index + 1)
            half = 0.5 * (left + right)
            self._values[key] = half + math.sqrt(2.0 ** -(depth + 1)) * self._normal(depth, index)
        return self._values[key]

    def __call__(self, u: float) -> torch.Tensor:
        """W(u): (B, *D)."""
        if not 0.0 <= u <= 1.0:
            raise ValueError(f"u must lie in [0, 1], got {u}")
        lo, hi, depth, index = 0.0, 1.0, 0, 0  # the interval [index, index + 1] / 2^depth
        while depth < self.max_depth:
            width = hi - lo
            if u in (lo, hi) or width <= self.rel_tol * u:
                break
            mid = 0.5 * (lo + hi)
            depth, index = depth + 1, 2 * index + (1 if u >= mid else 0)
            lo, hi = (mid, hi) if u >= mid else (lo, mid)
        a, b = self._value(depth, index), self._value(depth, index + 1)
        if u == lo:
            return a
        if u == hi:
            return b
        w = (u - lo) / (hi - lo)
        return a + w * (b - a)


class StepNoise:
    """Standard normal noise for the step from log-SNR lam_t to lam_s > lam_t of a sampler whose
    noise term is sigma_s sqrt(1 - e^(-2 eta h)) z (h = lam_s - lam_t): the exact solution of the
    linear part of the reverse SDE with noise scale eta (Lu et al. 2022, SDE-DPM-Solver++).

    brownian=False: a fresh keyed draw per step (`generator`). brownian=True: the increment of one
    Brownian path B(tau) per sample in tau = e^(2 eta lam), z = e^(-eta lam_s) (B(tau_s) -
    B(tau_t)) / sqrt(1 - e^(-2 eta h)), which is exact for that noise term (its variance
    integral is the tau increment), so every step count sees the same path."""

    def __init__(self, like: torch.Tensor, generator, eta: float, lam_range, brownian: bool):
        self.like, self.generator, self.eta = like, generator, float(eta)
        self.path = None
        if brownian and self.eta > 0:
            lo, hi = (math.exp(2 * self.eta * v) for v in lam_range)
            self.tau_lo, self.tau_span = lo, hi - lo
            self.path = KeyedBrownian(generator, tuple(like.shape), dtype=torch.float64,
                                      device=like.device)  # fmt: skip

    @classmethod
    def on_grid(cls, like: torch.Tensor, generator, eta: float, sde, ts: torch.Tensor,
                brownian: bool) -> StepNoise:  # fmt: skip
        """StepNoise over the log-SNR range of the time grid ts (from T down to eps)."""
        alpha, sigma = (v.tolist() for v in sde.alpha_sigma(ts[[0, -1]]))
        lam_range = [math.log(a / s) for a, s in zip(alpha, sigma, strict=True)]
        return cls(like, generator, eta, lam_range, brownian)

    def add_to(
        self, x: torch.Tensor, sigma_s: float, lam_t: float, lam_s: float, s_noise: float
    ) -> torch.Tensor:
        """x + sigma_s sqrt(1 - e^(-2 eta h)) s_noise z, the step's noise term (x where there is
        none: eta = 0 or s_noise = 0)."""
        if self.eta <= 0 or s_noise <= 0:
            return x
        scale = sigma_s * math.sqrt(-math.expm1(-2 * self.eta * (lam_s - lam_t))) * s_noise
        return x + scale * self(lam_t, lam_s)

    def __call__(self, lam_t: float, lam_s: float) -> torch.Tensor:
        if self.path is None:
            return randn_like(self.like, self.generator)
        u = [min(max((math.exp(2 * self.eta * v) - self.tau_lo) / self.tau_span, 0.0), 1.0)
             for v in (lam_t, lam_s)]  # fmt: skip
        db = math.sqrt(self.tau_span) * (self.path(u[1]) - self.path(u[0]))
        h = lam_s - lam_t
        scale = math.exp(-self.eta * lam_s) / math.sqrt(-math.expm1(-2 * self.eta * h))
        return (scale * db).to(self.like.dtype)
