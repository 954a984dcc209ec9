"""The variational bound (VLB) of a diffusion model on the data, continuous (VDM) or T-step (DDPM).

Kingma et al. 2021 (VDM), Sec. 3-4 and App.; Ho et al. 2020 (DDPM), eq. 5. With the marginal
z_t = alpha_t x + sigma_t eps and the negative log-SNR gamma(t) = log(sigma_t^2 / alpha_t^2)
(read from any SDE's `alpha_sigma`; sde=vdm has it in closed form), the model is: z_T ~ prior,
the reverse chain built on eps_hat(z_t, t) = -sigma_t score(z_t, t), and a decoder p(x | z_t0).
Its bound on -log p(x) is the sum of
  * prior:          KL(q(z_T | x) || N(0, s^2 I)), s = prior_std();
  * reconstruction: -log p(x | z_t0), z_t0 ~ q(z_t0 | x). For discrete data (L levels per
                    dimension, centres c_k evenly spaced on the model range) the decoder is VDM's
                    factorised one, p(x_i = c_k | z) = softmax_k(-(z_i / alpha - c_k)^2 /
                    (2 e^gamma)); for continuous data it is the Gaussian N(x; z / alpha, e^gamma),
                    and the bound is on -log of the density;
  * diffusion:      continuous time (T -> infinity):
                        1/2 E_{t ~ U[t0, T], eps}[(T - t0) gamma'(t) ||eps - eps_hat(z_t, t)||^2],
                    or, the same integral written in gamma (the VLB depends on the schedule only
                    through its end points), 1/2 (gamma_T - gamma_t0) E_{gamma ~ U}[...];
                    discrete, `steps` = N steps on the grid t_i = t0 + i (T - t0) / N:
                        sum_i KL(q(z_{t_(i-1)} | z_t_i, x) || p(z_{t_(i-1)} | z_t_i))
                      = 1/2 sum_i (exp(gamma_i - gamma_(i-1)) - 1) E||eps - eps_hat(z_t_i)||^2,
                    where p(z_s | z_t) = q(z_s | z_t, x = x_hat) with the posterior variance
                    (DDPM's sigma_t^2 = beta-tilde_t). It is larger than the continuous one and
                    decreases towards it as N grows (VDM, Sec. 3.5).

Monte Carlo: n samples per point, stratified (a shared uniform offset u per point: t_j or the step
index from (u + j) / n, VDM's low-discrepancy sampler); with n = N the discrete sum is exact in
the steps. The standard error is the collapsed-strata estimate (adjacent strata paired), a slight
over-estimate. The same functions give the training loss `training.loss=vlb`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from sde_lib import SDE, ScoreFn, append_dims, as_noise

TIME_SAMPLING = ("auto", "time", "log_snr")


def gamma_and_derivative(sde: SDE, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma(t) = log(sigma^2 / alpha^2) and d gamma / dt, each (B,): the SDE's closed form where
    it has one (sde=vdm, with gradients to its schedule), else by autograd through alpha_sigma."""
    if hasattr(sde, "gamma_and_derivative"):
        return sde.gamma_and_derivative(t)
    with torch.enable_grad():
        tt = t.detach().double().requires_grad_(True)
        alpha, sigma = sde.alpha_sigma(tt)
        gamma = 2 * (sigma.log() - alpha.log())
        (d,) = torch.autograd.grad(gamma.sum(), tt)
    return gamma.detach().to(t.dtype), d.to(t.dtype)


def resolve_time_sampling(sde: SDE, time_sampling: str) -> str:
    """auto: uniform t for an SDE with a learned schedule (its shape is trained to make that
    estimator's variance small), uniform log-SNR otherwise."""
    if time_sampling not in TIME_SAMPLING:
        raise ValueError(
            f"unknown time sampling {time_sampling!r}; allowed: {', '.join(TIME_SAMPLING)}"
        )
    if time_sampling != "auto":
        return time_sampling
    return "time" if hasattr(sde, "gamma_and_derivative") else "log_snr"


def _full(x: torch.Tensor, value: float, dtype=None) -> torch.Tensor:
    return torch.full((x.shape[0],), float(value), dtype=dtype or x.dtype, device=x.device)


def prior_kl(sde: SDE, x: torch.Tensor) -> torch.Tensor:
    """KL(N(alpha_T x, sigma_T^2 I) || N(0, s^2 I)) per example, nats: (B,)."""
    alpha, sigma = sde.alpha_sigma(_full(x, sde.T))
    a2, s2 = append_dims(alpha.square(), x.ndim), sigma.square()
    p2 = sde.prior_std() ** 2
    d = x[0].numel()
    mean_part = (a2 * x.square()).flatten(1).sum(1) / (2 * p2)
    return mean_part + 0.5 * d * (s2 / p2 - 1 - torch.log(s2 / p2))


def level_centres(levels: int, lo: float, hi: float, device=None, dtype=None) -> torch.Tensor:
    """The L values the discrete data take in model space, lo .. hi: (L,)."""
    return torch.linspace(lo, hi, levels, device=device, dtype=dtype)


def reconstruction(
    sde: SDE,
    x: torch.Tensor,
    t0: float,
    z: torch.Tensor,
    levels: int | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """-log p(x | z_t0) per example (nats, (B,)) at z_t0 = alpha x + sigma z, z: (B, *D) normal.

    levels=None: continuous data, Gaussian decoder N(x; z_t0 / alpha, sigma^2 / alpha^2), in
    closed form in z (z is not used).
    levels=L: VDM's discretised decoder over the L centres of data_range (module docstring)."""
    alpha, sigma = sde.alpha_sigma(_full(x, t0))
    ratio = append_dims((sigma / alpha).to(x.dtype), x.ndim)  # e^(gamma / 2)
    if levels is None:  # in expectation over z: E (x - z_t0 / alpha)^2 / var = 1 per dimension
        return 0.5 * x[0].numel() * (torch.log(2 * math.pi * ratio.square()) + 1).flatten(1)[:, 0]
    u = x + ratio * z  # z_t0 / alpha
    lo, hi = data_range
    c = level_centres(levels, lo, hi, device=x.device, dtype=x.dtype)
    k = torch.round((x - lo) / (hi - lo) * (levels - 1)).long().clamp(0, levels - 1)
    logits = -(u.unsqueeze(-1) - c).square() / (2 * ratio.square().unsqueeze(-1))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, k.unsqueeze(-1)).squeeze(-1)
    return -logp.flatten(1).sum(1)


def eps_error(sde: SDE, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor):
    """||eps - eps_hat(z_t, t)||^2 per row, eps_hat = -sigma_t score: x, z (N, *D), t (N,)."""
    alpha, sigma = (append_dims(c.to(x.dtype), x.ndim) for c in sde.alpha_sigma(t))
    xt = alpha * x + sigma * z
    eps_hat = -sigma * score_fn(xt, t.to(x.dtype))
    return (z - eps_hat).flatten(1).square().sum(1)


def _gamma_ends(sde: SDE, t0: float) -> tuple[float, float]:
    g, _ = gamma_and_derivative(sde, torch.tensor([t0, sde.T], dtype=torch.float64))
    return float(g[0]), float(g[1])


def _time_at_gamma(sde: SDE, gamma: torch.Tensor, t0: float, iters: int = 60) -> torch.Tensor:
    """Invert gamma(t) (increasing) on [t0, T] by float64 bisection: (N,) -> (N,)."""
    lo = torch.full_like(gamma, t0, dtype=torch.float64)
    hi = torch.full_like(lo, sde.T)
    g = gamma.double()
    with torch.no_grad():
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = gamma_and_derivative(sde, mid)[0].double() < g
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def diffusion_samples(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    u: torch.Tensor,
    z: torch.Tensor,
    *,
    t0: float,
    steps: int | None = None,
    time_sampling: str = "auto",
) -> torch.Tensor:
    """Samples of the diffusion term, one per row: x, z (N, *D), u (N,) uniforms -> (N,) nats.

    Each has expectation (over u and z) the diffusion term of the bound for its x: continuous
    (steps=None) with t or log-SNR uniform (`time_sampling`), or the discrete N-step sum."""
    u = u.to(torch.float64 if x.dtype == torch.float64 else x.dtype)
    if steps is not None:
        i = (u * steps).floor().clamp_max(steps - 1) + 1  # 1..N
        h = (sde.T - t0) / steps
        t, s = t0 + i * h, t0 + (i - 1) * h
        g_t = gamma_and_derivative(sde, t)[0]
        g_s = gamma_and_derivative(sde, s)[0]
        weight = steps * torch.expm1(g_t - g_s)
    elif resolve_time_sampling(sde, time_sampling) == "time":
        t = t0 + (sde.T - t0) * u
        _, dgamma = gamma_and_derivative(sde, t)
        weight = (sde.T - t0) * dgamma
    else:
        g0, g1 = _gamma_ends(sde, t0)
        t = _time_at_gamma(sde, g0 + (g1 - g0) * u.double(), t0).to(u.dtype)
        weight = torch.full_like(u, g1 - g0)
    return 0.5 * weight.to(x.dtype) * eps_error(sde, score_fn, x, t, z)


def stratified(u: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) offsets -> (B, n) points (u + j) / n, j = 0..n-1: one low-discrepancy set per row."""
    j = torch.arange(n, device=u.device, dtype=u.dtype)
    return ((u[:, None] + j) / n).clamp_max(1 - 1e-7 if u.dtype == torch.float32 else 1 - 1e-15)


def stratified_variance(h: torch.Tensor) -> torch.Tensor:
    """Variance of the row means of h (B, n), whose columns are draws in n ordered strata: the
    collapsed-strata estimator (adjacent pairs of strata taken as one stratum of two draws),
    sum_k (h_2k - h_2k+1)^2 / n^2, a slight over-estimate; the i.i.d. formula var / n would count
    the spread between strata, which stratification removes. (B,)"""
    n = h.shape[1]
    pairs = n // 2
    d = h[:, 1 : 2 * pairs : 2] - h[:, 0 : 2 * pairs : 2]
    return d.square().sum(1) / (n * n) * (n / (2 * pairs))


class VLBResult(NamedTuple):
    """Per-point bound and its parts (nats, (B,) each) and the Monte Carlo standard error of the
    bound (of the diffusion term and the reconstruction draw)."""

    bound: torch.Tensor
    stderr: torch.Tensor
    prior: torch.Tensor
    reconstruction: torch.Tensor
    diffusion: torch.Tensor


def vlb(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    levels: int | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    n_samples: int = 100,
    steps: int | None = None,
    eps: float = 1e-5,
    time_sampling: str = "auto",
    max_batch: int = 65536,
    generator=None,
) -> VLBResult:
    """Monte Carlo estimate of the variational bound on -log p(x) per point, nats (B,) each.

    x: (B, *D) in model space; levels/data_range: the discrete data's levels and model range
    (None: continuous data, a bound on the density); steps=None: continuous time, else the
    N-step discrete bound; eps: t0, where the decoder reads z; n_samples: diffusion-term samples
    per point (>= 2, stratified); generator: a torch.Generator or a noise source. No gradients.
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 to estimate a standard error, got {n_samples}")
    if steps is not None and (int(steps) != steps or steps < 1):
        raise ValueError(f"steps must be a positive integer or None, got {steps!r}")
    if not 0 < eps < sde.T:
        raise ValueError(f"need 0 < eps < T = {sde.T}, got eps={eps}")
    resolve_time_sampling(sde, time_sampling)
    noise = as_noise(generator)
    b = x.shape[0]
    per_call = max(1, max_batch // b)
    with torch.no_grad():
        prior = prior_kl(sde, x).double()
        if levels is None:
            recon, recon_var = reconstruction(sde, x, eps, None).double(), torch.zeros_like(prior)
        else:  # a few draws of z_t0 (the decoder is nearly deterministic at gamma_min)
            m = min(8, n_samples)
            z0 = noise.randn((b, m, *x.shape[1:]), dtype=x.dtype, device=x.device).flatten(0, 1)
            r = reconstruction(sde, x.repeat_interleave(m, dim=0), eps, z0, levels, data_range)
            r = r.double().reshape(b, m)
            recon, recon_var = r.mean(1), r.var(1) / m
        offset = noise.rand((b,), dtype=torch.float64, device=x.device)
        us = stratified(offset, n_samples)
        values = []
        for start in range(0, n_samples, per_call):
            n = min(per_call, n_samples - start)
            z = noise.randn((b, n, *x.shape[1:]), dtype=x.dtype, device=x.device).flatten(0, 1)
            u = us[:, start : start + n].reshape(-1)
            xs = x.repeat_interleave(n, dim=0)
            h = diffusion_samples(
                sde, score_fn, xs, u, z, t0=eps, steps=steps, time_sampling=time_sampling
            )
            values.append(h.double().reshape(b, n))
        h = torch.cat(values, dim=1)
        diffusion = h.mean(1)
        stderr = (stratified_variance(h) + recon_var).sqrt()
    bound = prior + recon + diffusion
    return VLBResult(bound, stderr, prior, recon, diffusion)


def bits_per_dim_discrete(nats: torch.Tensor, dim: int) -> torch.Tensor:
    """-log2 P(x) / D of a bound on -log P(x) of discrete data (no dequantisation offset)."""
    return nats / (dim * math.log(2))


__all__ = [
    "TIME_SAMPLING",
    "VLBResult",
    "bits_per_dim_discrete",
    "diffusion_samples",
    "gamma_and_derivative",
    "prior_kl",
    "reconstruction",
    "resolve_time_sampling",
    "stratified",
    "vlb",
]
