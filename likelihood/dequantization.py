"""Lower bounds on the log-probability of discrete data under a continuous density: uniform and
truncated-normal dequantisation, and the importance-weighted bound over K draws.

Integer levels k in {0, ..., L-1}^D are the cells of width delta = (hi - lo) / L centred at
c_k = lo + (k + 1/2) delta in model space. For a continuous model density p,
    P(k) = int_cell(k) p(x) dx >= exp E_q[log p(x) - log q(x)]
for any law q on the cell (Jensen; Theis et al. 2016, Ho et al. 2019), and with K independent
draws x_1..x_K ~ q the importance-weighted bound (Burda et al. 2016)
    log P(k) >= E[log 1/K sum_j p(x_j) / q(x_j)]
is never looser than K = 1 and tends to log P(k) as K grows.

  uniform:          q = U(cell), log q = -D log delta: the usual uniform dequantisation;
  truncated_normal: q = N(c_k, s^2 I) truncated to the cell, s = sigma(eps) / alpha(eps), the noise
                    the model was trained at where the likelihood's ODE starts (i-DODE, Zheng et
                    al. 2023, Sec. 4.2): training-free, and where s is well below delta the law
                    of x_eps given the cell is nearly this q, so the bound is nearly tight. Drawn
                    by the inverse CDF, log q = sum_d log N(u_d; 0, s^2) - D log Z with
                    Z = Phi(delta / 2s) - Phi(-delta / 2s).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sde_lib import as_noise

DEQUANTIZATIONS = ("uniform", "truncated_normal")

LogProbFn = Callable[[torch.Tensor], torch.Tensor]


def _check(k: torch.Tensor, levels: int, lo: float, hi: float) -> float:
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    if not hi > lo:
        raise ValueError(f"need hi > lo, got lo={lo}, hi={hi}")
    if k.min() < 0 or k.max() >= levels:
        raise ValueError(f"k must lie in [0, {levels - 1}], got [{k.min()}, {k.max()}]")
    return (hi - lo) / levels


def draw_dequantization(
    k: torch.Tensor,
    *,
    levels: int,
    lo: float,
    hi: float,
    kind: str = "uniform",
    std: float | None = None,
    generator=None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw x ~ q(. | k) per example and its log-density log q(x): ((B, *D), (B,)).
    std: the truncated normal's s (before truncation)."""
    if kind not in DEQUANTIZATIONS:
        raise ValueError(f"unknown dequantization {kind!r}; allowed: {', '.join(DEQUANTIZATIONS)}")
    delta = _check(k, levels, lo, hi)
    d = k[0].numel()
    u = as_noise(generator).rand(k.shape, dtype=torch.float64, device=k.device)
    centre = lo + (k.double() + 0.5) * delta
    if kind == "uniform":
        x = centre + (u - 0.5) * delta
        log_q = torch.full((k.shape[0],), -d * math.log(delta), dtype=torch.float64)
        return x.to(dtype), log_q.to(device=k.device, dtype=dtype)
    if std is None or not std > 0:
        raise ValueError(f"the truncated normal needs std > 0, got {std}")
    half = torch.tensor(delta / (2 * std), dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0)
    lower = normal.cdf(-half)
    mass = 1 - 2 * lower  # Z = Phi(b) - Phi(-b)
    z = torch.special.ndtri(lower + u * mass).clamp(-half, half)
    log_z = torch.log1p(-2 * lower)
    log_q = (-0.5 * z.square() - 0.5 * math.log(2 * math.pi) - math.log(std)).flatten(1).sum(1)
    log_q = log_q - d * log_z
    return (centre + std * z).to(dtype), log_q.to(dtype)


def dequantized_log_prob(
    log_prob: LogProbFn,
    k: torch.Tensor,
    *,
    levels: int,
    lo: float,
    hi: float,
    kind: str = "uniform",
    std: float | None = None,
    importance_samples: int = 1,
    generator=None,
) -> torch.Tensor:
    """The importance-weighted lower bound on log P(k) (nats, (B,)) from K = importance_samples
    draws of q, log_prob: x (B, *D) -> log p(x) (B,)."""
    if importance_samples < 1:
        raise ValueError(f"importance_samples must be >= 1, got {importance_samples}")
    weights = []
    for _ in range(importance_samples):
        x, log_q = draw_dequantization(
            k, levels=levels, lo=lo, hi=hi, kind=kind, std=std, generator=generator
        )
        weights.append(log_prob(x).double() - log_q.double())
    return torch.logsumexp(torch.stack(weights), 0) - math.log(importance_samples)
