"""Posterior sampling for linear inverse problems, y = A x + sigma_y e with e ~ N(0, I), from an
unconditional score model; every method is written for any linear SDE from alpha(t), sigma(t).

    dps          Diffusion posterior sampling (Chung et al. 2023, Alg. 1)
    pigdm        Pseudoinverse-guided diffusion (ΠGDM; Song et al. 2023, Alg. 1)
    ddrm         Denoising diffusion restoration (Kawar et al. 2022, eq. 7-8), in A's SVD basis
    replacement  Song et al. 2021 (App. I.2), for any A: A's row-space coordinates replaced by the
                 forward-noised measurement after every step
    tds          Twisted diffusion sampler (Wu et al. 2023): sequential Monte Carlo whose particles
                 are moved by a twisted proposal and reweighted; asymptotically exact in the
                 number of particles

Notation: on the grid t -> s, x0 = (x_t + sigma_t² score) / alpha_t is Tweedie's denoiser and
tilde-sigma = sigma / alpha the noise level of x / alpha. Every method ends with x0 at t = eps.
Each returns (x: (B, *D), nfe), nfe counting batched score evaluations (those of dps, pigdm and
tds also back-propagate through the network, about twice the cost of one).
"""

from __future__ import annotations

import math

import torch

from sde_lib import SDE, ScoreFn, as_noise

from .ddim import ddim_step
from .grids import Step, get_grid, intervals
from .operators import MAX_VALUES, LinearOperator, MatrixFreeOperator

METHODS = ("dps", "pigdm", "ddrm", "replacement", "tds")


def _denoise(score_fn: ScoreFn, x: torch.Tensor, t: float, alpha: float, sigma: float):
    """(score, Tweedie's x0) at time t."""
    score = score_fn(x, x.new_full((x.shape[0],), t))
    return score, (x + sigma**2 * score) / alpha


def _prior(sde: SDE, y: torch.Tensor, op: LinearOperator, generator, rows: int = 1):
    """x_T for each measurement (`rows` copies of each, drawn from its own noise row)."""
    n = op.n
    z = as_noise(generator).randn((y.shape[0], rows * n), device=y.device)
    return sde.prior_std() * z.reshape(y.shape[0] * rows, *op.shape)


def _spectral_measurement(op: LinearOperator, y: torch.Tensor, sigma_y: float):
    """(ybar, noise level) in V's basis: ybar_i = (Uᵀ y)_i / s_i and sigma_y / s_i where s_i > 0;
    ybar = 0 and an infinite noise level on A's null space. (B, n), (n,) float64."""
    s = torch.zeros(op.n, dtype=torch.float64, device=y.device)
    s[: op.m] = op.s
    pos = s > 0
    ybar = torch.zeros(y.shape[0], op.n, dtype=torch.float64, device=y.device)
    ybar[:, : op.m] = op.y_spectral(y) / op.s.clamp_min(1e-300)
    ybar[:, ~pos] = 0
    level = torch.full_like(s, math.inf)
    level[pos] = sigma_y / s[pos]
    return ybar, level


def _gaussian_likelihood(
    op: LinearOperator, y: torch.Tensor, x0: torch.Tensor, r2: float, sigma_y: float
):
    """log N(y; A x0, r2 A Aᵀ + sigma_y² I) per row (B,), and C⁻¹ (y - A x0) (B, m), both float64,
    by A's SVD: C = U diag(r2 s² + sigma_y²) Uᵀ (a pseudo-inverse where that is 0)."""
    d = r2 * op.s.square() + sigma_y**2
    inv = torch.where(d > 0, 1 / d.clamp_min(1e-300), 0.0)
    resid = op.y_spectral(y - op(x0).double())  # Uᵀ (y - A x0)
    logp = -0.5 * (resid.square() * inv).sum(1) - 0.5 * d[d > 0].log().sum()
    return logp - 0.5 * int((d > 0).sum()) * math.log(2 * math.pi), (resid * inv) @ op.u.T


def _r2(st_alpha: float, st_sigma: float) -> float:
    """ΠGDM's r_t² = tilde-sigma² / (1 + tilde-sigma²): the variance of x0 given x_t under a
    standard normal data law (Song et al. 2023, eq. 8)."""
    v = (st_sigma / st_alpha) ** 2
    return v / (1 + v)


def sample_dps(
    sde: SDE,
    score_fn: ScoreFn,
    op: LinearOperator,
    y: torch.Tensor,
    *,
    sigma_y: float = 0.0,
    steps: int = 1000,
    eps: float = 1e-3,
    grid: str = "uniform",
    scale: float = 1.0,
    eta: float = 1.0,
    generator=None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """DPS: a DDIM step (eta = 1: ancestral, as in the paper), then a step of `scale` down the
    gradient in x_t of the residual norm ||y - A x0(x_t)|| (the step size zeta' / ||y - A x0|| of
    the paper's Alg. 1 times the gradient of the squared norm, up to the factor 2 that the authors'
    code drops). sigma_y does not enter DPS's update."""
    x = _prior(sde, y, op, generator)
    for st in intervals(sde, get_grid(grid, sde, steps, eps), progress):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            score, x0 = _denoise(score_fn, x, st.t, st.alpha_t, st.sigma_t)
            norm = (y - op(x0)).norm(dim=1)
            (grad,) = torch.autograd.grad(norm.sum(), x)
        x = ddim_step(x.detach(), score.detach(), st, eta, generator) - scale * grad
    _, x0 = _denoise(score_fn, x, eps, *_alpha_sigma(sde, eps))
    return x0.detach(), steps + 1


def sample_pigdm(
    sde: SDE,
    score_fn: ScoreFn,
    op: LinearOperator,
    y: torch.Tensor,
    *,
    sigma_y: float = 0.0,
    steps: int = 100,
    eps: float = 1e-3,
    grid: str = "uniform",
    eta: float = 1.0,
    generator=None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """ΠGDM: p(y | x_t) ~ N(y; A x0(x_t), r_t² A Aᵀ + sigma_y² I), whose gradient
    g = (d x0 / d x_t)ᵀ Aᵀ C⁻¹ (y - A x0) is one vector-Jacobian product. The paper moves x0 by
    alpha_t r_t² g (Alg. 1), i.e. adds g r_t² / tilde-sigma_t² = g / (1 + tilde-sigma_t²) to the
    score: the exact conditional score of Gaussian data at low noise, damped at high noise where
    the network's Jacobian, divided by alpha_t, is least trustworthy (with the undamped g the
    digits U-Net diverges in its first step). The DDIM step (eta) moves with the guided score."""
    x = _prior(sde, y, op, generator)
    for st in intervals(sde, get_grid(grid, sde, steps, eps), progress):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            score, x0 = _denoise(score_fn, x, st.t, st.alpha_t, st.sigma_t)
            _, v = _gaussian_likelihood(op, y, x0.detach(), _r2(st.alpha_t, st.sigma_t), sigma_y)
            (g,) = torch.autograd.grad((op(x0) * v.to(x0.dtype)).sum(), x)
        weight = 1 / (1 + (st.sigma_t / st.alpha_t) ** 2)
        x = ddim_step(x.detach(), score.detach() + weight * g, st, eta, generator)
    _, x0 = _denoise(score_fn, x, eps, *_alpha_sigma(sde, eps))
    return x0.detach(), steps + 1


def sample_ddrm(
    sde: SDE,
    score_fn: ScoreFn,
    op: LinearOperator,
    y: torch.Tensor,
    *,
    sigma_y: float = 0.0,
    steps: int = 20,
    eps: float = 1e-3,
    grid: str = "uniform",
    eta: float = 0.85,
    eta_b: float = 1.0,
    generator=None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """DDRM in V's basis on x / alpha (noise level tilde-sigma), coordinate by coordinate, with
    c = Vᵀ x / alpha, c0 = Vᵀ x0 and z ~ N(0, I):
        null space:              c0 + ts_s (sqrt(1 - eta²) (c - c0) / ts_t + eta z)
        ts_s < sigma_y / s_i:    c0 + ts_s (sqrt(1 - eta²) (ybar - c0) / (sigma_y/s_i) + eta z)
        ts_s >= sigma_y / s_i:   (1 - eta_b) c0 + eta_b ybar + sqrt(ts_s² - (eta_b sigma_y/s_i)²) z
    Defaults eta = 0.85, eta_b = 1 and 20 steps are the paper's. After the last step the rule is
    applied once more at noise 0 to Tweedie's x0 (a noiseless measurement is then kept exactly
    when eta_b = 1)."""
    ybar, level = _spectral_measurement(op, y, sigma_y)
    null, weak = level.isinf(), level.isfinite()
    safe = torch.where(weak & (level > 0), level, 1.0)
    noise = as_noise(generator)
    x = _prior(sde, y, op, generator)
    for st in intervals(sde, get_grid(grid, sde, steps, eps), progress):
        score, x0 = _denoise(score_fn, x, st.t, st.alpha_t, st.sigma_t)
        ts_t, ts_s = st.sigma_t / st.alpha_t, st.sigma_s / st.alpha_s
        c, c0 = op.spectral(x) / st.alpha_t, op.spectral(x0)
        z = noise.randn(c.shape, dtype=torch.float64, device=c.device)
        keep = math.sqrt(1 - eta**2)
        in_null = c0 + ts_s * (keep * (c - c0) / ts_t + eta * z)
        below = c0 + ts_s * (keep * (ybar - c0) / safe + eta * z)
        above = (1 - eta_b) * c0 + eta_b * ybar
        above = above + (ts_s**2 - (eta_b * level.where(weak, 0.0)) ** 2).clamp_min(0).sqrt() * z
        out = torch.where(null, in_null, torch.where(ts_s < level, below, above))
        x = st.alpha_s * op.from_spectral(out, x)
    _, x0 = _denoise(score_fn, x, eps, *_alpha_sigma(sde, eps))
    c0 = op.spectral(x0)  # the same rule once more, down to noise 0
    out = torch.where(weak & (level == 0), (1 - eta_b) * c0 + eta_b * ybar, c0)
    return op.from_spectral(out, x0), steps + 1


def sample_replacement(
    sde: SDE,
    score_fn: ScoreFn,
    op: LinearOperator,
    y: torch.Tensor,
    *,
    sigma_y: float = 0.0,
    steps: int = 1000,
    eps: float = 1e-3,
    grid: str = "uniform",
    eta: float = 1.0,
    generator=None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """The replacement method for any A: after every DDIM step (eta = 1: ancestral) to noise
    tilde-sigma_s, each coordinate of x / alpha_s in V's basis whose measurement noise
    sigma_y / s_i is at most tilde-sigma_s is replaced by ybar_i + sqrt(tilde-sigma_s² -
    (sigma_y / s_i)²) z, a draw of exactly its forward law given y; at the end the noiseless
    coordinates equal ybar. With sigma_y = 0 this is the classic method (the whole row space, and
    a mask's known values); with noise, the coordinates that y knows less well than the current
    noise level are left to the model (replacing them amplifies the noise by 1 / s_i)."""
    ybar, level = _spectral_measurement(op, y, sigma_y)
    noise = as_noise(generator)

    def replace(x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        c = op.spectral(x)
        z = noise.randn(c.shape, dtype=torch.float64, device=c.device)
        ts = sigma / alpha
        known = level <= ts
        fresh = ybar + (ts**2 - level.where(known, 0.0) ** 2).clamp_min(0).sqrt() * z
        return op.from_spectral(torch.where(known, alpha * fresh, c), x)

    x = _prior(sde, y, op, generator)
    for i, st in enumerate(intervals(sde, get_grid(grid, sde, steps, eps), progress)):
        if i == 0:
            x = replace(x, st.alpha_t, st.sigma_t)
        score, _ = _denoise(score_fn, x, st.t, st.alpha_t, st.sigma_t)
        x = replace(ddim_step(x, score, st, eta, generator), st.alpha_s, st.sigma_s)
    _, x0 = _denoise(score_fn, x, eps, *_alpha_sigma(sde, eps))
    return op.from_spectral(torch.where(level == 0, ybar, op.spectral(x0)), x0), steps + 1


def sample_tds(
    sde: SDE,
    score_fn: ScoreFn,
    op: LinearOperator,
    y: torch.Tensor,
    *,
    sigma_y: float = 0.1,
    steps: int = 200,
    eps: float = 1e-3,
    grid: str = "uniform",
    particles: int = 16,
    resample_below: float = 0.5,
    generator=None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Twisted diffusion sampler (Wu et al. 2023, Alg. 1) with `particles` per measurement.

    Twisting function p~_t(y | x_t) = N(y; A x0(x_t), r_t² A Aᵀ + sigma_y² I) (ΠGDM's), target
    the model's ancestral chain (DDIM, eta = 1: x_s ~ N(mu, c² I)) times p(y | x0). Each step
    draws x_s from N(mu + c² w grad log p~_t, c² I) (w = 1 / (1 + tilde-sigma_t²), ΠGDM's
    damping: any shift leaves the weights exact, this one keeps a network's proposal stable),
    multiplies the weight by
    N(x_s; mu, c²) p~_s(y | x_s) / (N(x_s; mu + c² w grad, c²) p~_t(y | x_t)), and resamples
    (systematically) a measurement's particles when their effective share falls below
    `resample_below`; the last weight swaps p~ for the true likelihood N(y; A x0, sigma_y² I).
    One particle per measurement is returned, drawn by weight. Needs sigma_y > 0.
    """
    if not sigma_y > 0:
        raise ValueError("method=tds needs sigma_y > 0 (its weights are the observation density)")
    if not isinstance(particles, int) or particles < 1:
        raise ValueError(f"particles must be an integer >= 1, got {particles!r}")
    b, k = y.shape[0], particles
    noise = as_noise(generator)
    yk = y.repeat_interleave(k, 0)

    def twist(x: torch.Tensor, t: float, alpha: float, sigma: float):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            score, x0 = _denoise(score_fn, x, t, alpha, sigma)
            logp, _ = _gaussian_likelihood(op, yk, x0, _r2(alpha, sigma), sigma_y)
            (grad,) = torch.autograd.grad(logp.sum(), x)
        return score.detach(), x0.detach(), logp.detach().reshape(b, k), grad

    x = _prior(sde, y, op, generator, rows=k)
    ts = get_grid(grid, sde, steps, eps)
    first = next(intervals(sde, ts))
    score, x0, logp, grad = twist(x, first.t, first.alpha_t, first.sigma_t)
    logw = logp.clone()
    for st in intervals(sde, ts, progress):
        pick, low = _resample(logw, resample_below, noise)
        if pick is not None:
            x, score, x0, grad = (v[pick] for v in (x, score, x0, grad))
            logp = logp.flatten()[pick].reshape(b, k)
            logw = logw.masked_fill(low[:, None], 0.0)
        c2 = _ancestral_variance(st)
        mean = ddim_step(x, score, st, 1.0, None, noise_free=True)
        shifted = mean + c2 / (1 + (st.sigma_t / st.alpha_t) ** 2) * grad  # ΠGDM's damping
        z = noise.randn((b, k * op.n), dtype=x.dtype, device=x.device).reshape(x.shape)
        x = shifted + math.sqrt(c2) * z
        move = ((x - shifted).square() - (x - mean).square()).flatten(1).double().sum(1) / (2 * c2)
        score, x0, logp_s, grad = twist(x, st.s, st.alpha_s, st.sigma_s)
        logw = logw + move.reshape(b, k) + logp_s - logp
        logp = logp_s
    true, _ = _gaussian_likelihood(op, yk, x0, 0.0, sigma_y)
    logw = logw + true.reshape(b, k) - logp
    u = noise.rand((b, 1), dtype=torch.float64, device=logw.device)
    choice = torch.searchsorted(torch.softmax(logw, 1).cumsum(1), u).clamp_max(k - 1).squeeze(1)
    return x0.reshape(b, k, *op.shape)[torch.arange(b), choice], steps + 1


def _ancestral_variance(st: Step) -> float:
    """c² of the ancestral (DDPM) step t -> s: sigma_s² (1 - (alpha_t sigma_s / alpha_s sigma_t)²),
    the variance of its noise."""
    ratio = st.alpha_t * st.sigma_s / (st.alpha_s * st.sigma_t)
    return st.sigma_s**2 * max(1 - ratio**2, 0.0)


def _resample(logw: torch.Tensor, threshold: float, noise):
    """Systematic resampling of the rows of logw (B, K) whose effective sample share
    (sum w)² / (K sum w²) is below `threshold`: (flat indices into the B K particles, or None
    if no row is resampled; the rows resampled, (B,) bool)."""
    b, k = logw.shape
    w = torch.softmax(logw, 1)
    low = 1 / (k * w.square().sum(1)) < threshold
    u = noise.rand((b, 1), dtype=torch.float64, device=logw.device)
    if not bool(low.any()):
        return None, low
    points = (u + torch.arange(k, dtype=torch.float64, device=logw.device)) / k
    idx = torch.searchsorted(w.cumsum(1), points).clamp_max(k - 1)
    own = torch.arange(k, device=logw.device).expand(b, k)
    idx = torch.where(low[:, None], idx, own)
    return (idx + k * torch.arange(b, device=logw.device)[:, None]).flatten(), low


def _alpha_sigma(sde: SDE, t: float) -> tuple[float, float]:
    a, s = sde.alpha_sigma(torch.tensor([t], dtype=torch.float64))
    return float(a), float(s)


SOLVERS = {
    "dps": sample_dps,
    "pigdm": sample_pigdm,
    "ddrm": sample_ddrm,
    "replacement": sample_replacement,
    "tds": sample_tds,
}


def posterior_sample(
    method: str,
    sde: SDE,
    score_fn: ScoreFn,
    op: LinearOperator | MatrixFreeOperator,
    y: torch.Tensor,
    **options,
) -> tuple[torch.Tensor, int]:
    """Draw x ~ p(x | y) for each measurement y: (B, m) with `method` (one of METHODS)."""
    if method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if options.get("sigma_y", 0.0) < 0:
        raise ValueError(f"sigma_y must be >= 0, got {options['sigma_y']}")
    if method != "dps" and not op.has_svd:
        raise ValueError(
            f"method={method} needs A's SVD, which operator={op.name} on examples of {op.n} values "
            f"does not have (dense operators stop at {MAX_VALUES} values); use method=dps"
        )
    if y.ndim != 2 or y.shape[1] != op.m:
        raise ValueError(f"y must be (B, {op.m}) for operator {op.name}, got {tuple(y.shape)}")
    return SOLVERS[method](sde, score_fn, op.to(y.device), y, **options)
