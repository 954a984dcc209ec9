"""Bits per dimension of discrete data under a continuous density, by uniform dequantisation.

Data are integer levels k in {0, ..., L-1}^D, shown to the model as
    x = lo + (hi - lo) u,    u = (k + U) / L,    U ~ Uniform[0, 1)^D.
The model's density p_x on [lo, hi]^D induces p_u(u) = p_x(x) (hi - lo)^D on [0, 1)^D (change of
variables, Jacobian (hi - lo)^D). The cell of k has volume L^-D, so the discrete model
P(k) = int_cell p_u du = L^-D E_U[p_u((k + U) / L)] and, by Jensen's inequality,
    log P(k) >= E_U[log p_u((k + U) / L)] - D log L
             = E_U[log p_x(x)] + D log(hi - lo) - D log L
(uniform dequantisation, Theis et al. 2016; with a learned law of U given k in place of the
uniform one it is the variational dequantisation of Ho et al. 2019).
In bits per dimension (an upper bound on -log2 P(k) / D, tight when p_u is flat on each cell):
    bpd = -(E_U[log p_x(x)] + D log(hi - lo) - D log L) / (D ln 2).
The expectation over U is estimated by averaging log p_x over `n_draws` dequantisations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .dequantization import draw_dequantization

LogProbFn = Callable[[torch.Tensor], torch.Tensor]


def dequantize(
    k: torch.Tensor,
    *,
    levels: int,
    lo: float = 0.0,
    hi: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """x = lo + (hi - lo) (k + U) / L with U ~ Uniform[0, 1): integer k (B, *D) -> x (B, *D)
    (the uniform case of `likelihood.dequantization.draw_dequantization`)."""
    x, _ = draw_dequantization(k, levels=levels, lo=lo, hi=hi, generator=generator, dtype=dtype)
    return x


def bits_per_dim(
    logp_x: torch.Tensor, *, dim: int, levels: int, lo: float = 0.0, hi: float = 1.0
) -> torch.Tensor:
    """bpd = -(log p_x(x) + D log(hi - lo) - D log L) / (D ln 2), elementwise on logp_x (nats)."""
    if not hi > lo:
        raise ValueError(f"need hi > lo, got lo={lo}, hi={hi}")
    return -(logp_x + dim * (math.log(hi - lo) - math.log(levels))) / (dim * math.log(2))


def dequantized_bpd(
    log_prob: LogProbFn,
    k: torch.Tensor,
    *,
    levels: int,
    lo: float = 0.0,
    hi: float = 1.0,
    n_draws: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bits/dim bound for integer data k: (B, *D) -> (B,), log_prob: x (B, *D) -> log p_x (B,).

    Averages log p_x over n_draws dequantisations before converting (the bound above).
    """
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    draws = [
        log_prob(dequantize(k, levels=levels, lo=lo, hi=hi, generator=generator))
        for _ in range(n_draws)
    ]
    logp = torch.stack(draws).mean(0)
    return bits_per_dim(logp, dim=k[0].numel(), levels=levels, lo=lo, hi=hi)
