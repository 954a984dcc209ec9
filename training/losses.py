"""Training objectives as small callables: loss(score_fn, x0, generator) -> per-example loss (B,).

All are written with the SDE's marginal x_t = alpha(t) x_0 + sigma(t) z and the score only, so they
work for every SDE and every network parameterisation.
"""

from __future__ import annotations

import contextlib
import math

import torch

from likelihood import log_likelihood
from likelihood.vlb import (
    diffusion_samples,
    prior_kl,
    reconstruction,
    resolve_time_sampling,
    stratified,
)
from samplers.grids import t_from_log_snr
from sde_lib import SDE, ScoreFn, append_dims, as_noise


def _sum(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).sum(1)


def _perturb(sde: SDE, x0: torch.Tensor, t: torch.Tensor, g: torch.Generator | None):
    z = as_noise(g).randn(x0.shape, dtype=x0.dtype, device=x0.device)
    alpha, sigma = sde.alpha_sigma(t)
    alpha, sigma = alpha.to(x0.dtype), sigma.to(x0.dtype)
    return append_dims(alpha, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * z, z, sigma


def _uniform_t(n: int, sde: SDE, eps: float, x0: torch.Tensor, g: torch.Generator | None):
    u = as_noise(g).rand((n,), dtype=x0.dtype, device=x0.device)
    return eps + (sde.T - eps) * u


NOISE_DISTRIBUTIONS = ("uniform_t", "lognormal", "logsnr_uniform")
WEIGHTINGS = ("sigma2", "likelihood", "edm")


class TimeSampler:
    """Training times t in [eps, T] drawn from a proposal q, with importance weights
    w(t) = 1 / ((T - eps) q(t)), so that E_q[w f(t)] = E_{t ~ U(eps, T)}[f(t)]: the loss stays an
    unbiased estimate of the same objective, only its variance changes.

    uniform_t: t ~ U(eps, T), w = 1.
    lognormal (EDM, Karras et al. 2022): ln s ~ N(p_mean, p_std^2), s = sigma / alpha, truncated
        to the SDE's range [s(eps), s(T)]; logsnr_uniform: ln s uniform on that range (the
        log-SNR -2 ln s is then uniform). Both draw ln s by the inverse CDF of one uniform and
        find t(s) by bisection (`samplers.grids.t_from_log_snr`); the density of t is
        q_s(ln s) d ln s / dt with d ln s / dt = g^2 / (2 sigma^2).
    """

    def __init__(
        self,
        sde: SDE,
        eps: float,
        kind: str = "uniform_t",
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ) -> None:
        if kind not in NOISE_DISTRIBUTIONS:
            raise ValueError(f"unknown noise {kind!r}; allowed: {', '.join(NOISE_DISTRIBUTIONS)}")
        if not p_std > 0:
            raise ValueError(f"p_std={p_std} must be > 0")
        self.sde, self.eps, self.kind = sde, float(eps), kind
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def _log_s(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.sde.alpha_sigma(t)
        return (sigma / alpha).log()

    @torch.no_grad()
    def fit(self, importance_weights: bool = True, n: int = 4001) -> float:
        """How well the proposal fits this SDE: the share of a batch that its importance weights
        leave effective, ESS / n = 1 / E_q[w^2] (1 for uniform t; 1 also without the weights,
        whose objective is then the proposal's own). Computed by quadrature over ln s, where
        E_q[w^2] = integral of 1 / ((T - eps)^2 q_s(ln s) (d ln s / dt)^2) d ln s. ValueError
        where the proposal puts no mass on the SDE's range."""
        if self.kind == "uniform_t":
            return 1.0
        ends = torch.tensor([self.eps, self.sde.T], dtype=torch.float64)
        lo, hi = self._log_s(ends).tolist()
        normal = torch.distributions.Normal(self.p_mean, self.p_std)
        if self.kind == "lognormal":
            mass = float(normal.cdf(torch.tensor(hi)) - normal.cdf(torch.tensor(lo)))
            if not mass > 1e-12:
                raise ValueError(
                    f"lognormal noise N({self.p_mean}, {self.p_std}^2) puts no mass on this "
                    f"SDE's ln(sigma / alpha) range [{lo:.3g}, {hi:.3g}]"
                )
        if not importance_weights:
            return 1.0
        log_s = torch.linspace(lo, hi, n, dtype=torch.float64)
        t = t_from_log_snr(self.sde, -log_s, self.sde.T, self.eps)
        sigma = self.sde.alpha_sigma(t)[1].double()
        g2 = self.sde.sde(torch.zeros_like(t)[:, None], t)[1].double().square()
        dlog_s = g2 / (2 * sigma.square())
        if self.kind == "lognormal":
            q_log = normal.log_prob(log_s).exp() / mass
        else:
            q_log = torch.full_like(log_s, 1 / (hi - lo))
        span = self.sde.T - self.eps
        second_moment = torch.trapezoid(1 / (span**2 * q_log * dlog_s.square()), log_s)
        return float(1 / second_moment)

    @torch.no_grad()
    def __call__(self, n: int, x0: torch.Tensor, g) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, w), each (n,) in x0's dtype and device."""
        span = self.sde.T - self.eps
        if self.kind == "uniform_t":
            t = _uniform_t(n, self.sde, self.eps, x0, g)
            return t, torch.ones_like(t)
        u = as_noise(g).rand((n,), dtype=torch.float64, device=x0.device)
        ends = torch.tensor([self.eps, self.sde.T], dtype=torch.float64, device=x0.device)
        lo, hi = self._log_s(ends).tolist()
        normal = torch.distributions.Normal(self.p_mean, self.p_std)
        if self.kind == "lognormal":
            c_lo, c_hi = normal.cdf(torch.tensor(lo)), normal.cdf(torch.tensor(hi))
            if not c_hi - c_lo > 1e-12:
                raise ValueError(
                    f"lognormal noise N({self.p_mean}, {self.p_std}^2) puts no mass on this "
                    f"SDE's ln(sigma / alpha) range [{lo:.3g}, {hi:.3g}]"
                )
            target = normal.icdf((c_lo + (c_hi - c_lo) * u).clamp(1e-300, 1 - 1e-16))
            target = target.clamp(lo, hi)
        else:
            target = lo + (hi - lo) * u
        t = t_from_log_snr(self.sde, -target, self.sde.T, self.eps)  # lambda = -ln s
        alpha, sigma = self.sde.alpha_sigma(t)
        g2 = self.sde.sde(torch.zeros_like(t)[:, None], t)[1].double().square()
        dlog_s = g2 / (2 * sigma.square())
        if self.kind == "lognormal":
            q_log = normal.log_prob(self._log_s(t)).exp() / (c_hi - c_lo)
        else:
            q_log = torch.full_like(t, 1 / (hi - lo))
        w = 1 / (span * q_log * dlog_s)
        return t.to(x0.dtype), w.to(x0.dtype)


class DSMLoss:
    """Continuous-time denoising score matching (Song et al. 2021, eq. 7).

    loss = 1/2 lambda(t) |s(x_t, t) + z / sigma(t)|^2 with t ~ U(eps, T) (or another proposal,
    importance-weighted to the same objective: `TimeSampler`; `importance_weights=False` makes
    the proposal's expectation the objective, as EDM's recipe does); lambda = sigma^2 ("sigma2",
    default), g(t)^2 ("likelihood": Song, Durkan et al. 2021) or EDM's ("edm"):
    lambda(s) = (s^2 + sd^2) / (s sd)^2 on the denoiser's error |D - x_0|^2, where
    D - x_0 = s^2 alpha (s(x_t) + z / sigma) in EDM's coordinates (s = sigma / alpha), so that
    lambda_DSM = sigma^2 (s^2 + sd^2) / sd^2.
    """

    def __init__(
        self,
        sde: SDE,
        eps: float = 1e-5,
        likelihood_weighting: bool = False,
        noise: str = "uniform_t",
        weighting: str | None = None,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        importance_weights: bool = True,
    ) -> None:
        weighting = weighting or ("likelihood" if likelihood_weighting else "sigma2")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
        self.sde, self.eps, self.weighting, self.sigma_data = sde, eps, weighting, sigma_data
        self.times = TimeSampler(sde, eps, noise, p_mean, p_std)
        self.importance_weights = importance_weights

    def __call__(self, score_fn: ScoreFn, x0: torch.Tensor, g: torch.Generator | None = None):
        t, w = self.times(x0.shape[0], x0, g)
        if not self.importance_weights:  # the objective is the expectation under the proposal
            w = torch.ones_like(w)
        xt, z, sigma = _perturb(self.sde, x0, t, g)
        s = score_fn(xt, t)
        if self.weighting == "sigma2":
            return w * 0.5 * _sum((append_dims(sigma, x0.ndim) * s + z).square())
        if self.weighting == "likelihood":
            lam = self.sde.sde(torch.zeros_like(x0), t)[1].square().to(x0.dtype)
        else:
            alpha = self.sde.alpha_sigma(t)[0].to(x0.dtype)
            sd2 = self.sigma_data**2
            lam = sigma.square() * ((sigma / alpha).square() + sd2) / sd2
        return w * 0.5 * lam * _sum((s + z / append_dims(sigma, x0.ndim)).square())


class SSMLoss:
    """Sliced score matching on the perturbed data, variance-reduced form (Song et al. 2019).

    For x_t ~ p_t: loss = lambda(t) [1/2 |s|^2 + v^T (d s / d x) v], averaged over `n_projections`
    probes v with E[v v^T] = I (Rademacher or Gaussian), lambda = sigma(t)^2. The minimiser is the
    score of p_t, as for DSM, but no knowledge of the kernel's score is used: only samples x_t.
    The 1/2 (v^T s)^2 term of plain SSM is replaced by its expectation 1/2 |s|^2 (SSM-VR).
    """

    def __init__(
        self, sde: SDE, eps: float = 1e-5, n_projections: int = 1, projection: str = "rademacher"
    ) -> None:
        if projection not in ("rademacher", "gaussian"):
            raise ValueError(f"unknown projection {projection!r}; allowed: rademacher, gaussian")
        self.sde, self.eps, self.n, self.projection = sde, eps, n_projections, projection

    def _probe(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        # drawn as (B, n, *D) so that each example's probes are its own (per-example noise)
        v = as_noise(g).randn((x.shape[0], self.n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        v = v.transpose(0, 1)
        return v.sign() if self.projection == "rademacher" else v

    def __call__(self, score_fn: ScoreFn, x0: torch.Tensor, g: torch.Generator | None = None):
        t = _uniform_t(x0.shape[0], self.sde, self.eps, x0, g)
        xt, _, sigma = _perturb(self.sde, x0, t, g)
        xt = xt.detach().requires_grad_(True)
        s = score_fn(xt, t)
        vjv = 0.0
        for v in self._probe(x0, g):
            (jv,) = torch.autograd.grad(_sum(s * v).sum(), xt, create_graph=True)
            vjv = vjv + _sum(jv * v) / self.n
        return sigma.square() * (0.5 * _sum(s.square()) + vjv)


class DiscreteDSMLoss:
    """Denoising score matching on a fixed grid of N noise levels (the discrete-time models).

    'ddpm': L_simple of Ho et al. 2020, |eps - eps_theta|^2 = |sigma s + z|^2 at t_i = i / N,
            i ~ U{1..N} (N = 1000).
    'smld': the NCSN objective of Song & Ermon 2019, 1/2 sigma_i^2 |s + z / sigma_i|^2 at
            t_i = eps + (T - eps) i / (N - 1), i ~ U{0..N-1}; under VE the sigma_i are geometric.
    """

    def __init__(self, sde: SDE, kind: str, n_levels: int = 1000, eps: float = 1e-5) -> None:
        if kind == "ddpm":
            self.times = torch.arange(1, n_levels + 1, dtype=torch.float64) * (sde.T / n_levels)
            self.scale = 1.0
        elif kind == "smld":
            self.times = torch.linspace(eps, sde.T, n_levels, dtype=torch.float64)
            self.scale = 0.5
        else:
            raise ValueError(f"unknown discrete loss {kind!r}; allowed: ddpm, smld")
        self.sde = sde

    def __call__(self, score_fn: ScoreFn, x0: torch.Tensor, g: torch.Generator | None = None):
        i = as_noise(g).randint(len(self.times), (x0.shape[0],), device=x0.device)
        t = self.times.to(x0.device)[i].to(x0.dtype)
        xt, z, sigma = _perturb(self.sde, x0, t, g)
        s = score_fn(xt, t)
        return self.scale * _sum((append_dims(sigma, x0.ndim) * s + z).square())


class VLBLoss:
    """The VDM objective (Kingma et al. 2021): the variational bound on -log p(x), in bits/dim.

    prior KL at T + discretised reconstruction at t0 = eps (a decoder over the data's `levels`;
    None: a Gaussian decoder for continuous data) + the continuous diffusion loss
    1/2 E_t[(T - t0) gamma'(t) ||eps - eps_hat(z_t, t)||^2] (likelihood.vlb). Each example takes
    `time_samples` times (u + j) / k, j < k, from one uniform offset u: VDM's low-discrepancy
    sampler, drawn per example so that every draw stays keyed by the example (the noise
    source's contract, which keeps training world-size invariant). Time sampling is uniform in t
    for an SDE with a learned schedule and uniform in log-SNR otherwise (`likelihood.vlb`).

    With a learned schedule (sde=vdm) its shape parameters are trained on the gradient of the
    squared diffusion loss (the variance of its estimator, the mean being shape-invariant) and
    the end points on the bound itself (VDM App. I.2; `sde_lib.vdm.GammaSchedule`).
    Returns (B,) bits per dimension.
    """

    def __init__(
        self,
        sde: SDE,
        levels: int | None = None,
        data_range: tuple[float, float] = (-1.0, 1.0),
        eps: float = 1e-5,
        time_samples: int = 2,
        time_sampling: str = "auto",
    ) -> None:

        if int(time_samples) < 1:
            raise ValueError(f"time_samples must be >= 1, got {time_samples}")
        self.sde, self.levels, self.data_range = sde, levels, tuple(data_range)
        self.eps, self.k = float(eps), int(time_samples)
        self.time_sampling = resolve_time_sampling(sde, time_sampling)
        module = getattr(sde, "module", None)
        learnable = module is not None and any(p.requires_grad for p in module.parameters())
        self.schedule = module if learnable and hasattr(module, "variance_gradient") else None

    def __call__(self, score_fn: ScoreFn, x0: torch.Tensor, g=None, labels=None):

        if labels is not None:  # a conditional network: the bound of p(x | y)
            model = score_fn

            def score_fn(x, t):
                return model(x, t, labels.repeat_interleave(x.shape[0] // labels.shape[0]))

        noise = as_noise(g)
        b, k = x0.shape[0], self.k
        u = noise.rand((b,), dtype=torch.float64, device=x0.device)
        z = noise.randn((b, k, *x0.shape[1:]), dtype=x0.dtype, device=x0.device).flatten(0, 1)
        z0 = noise.randn(x0.shape, dtype=x0.dtype, device=x0.device)
        ts = stratified(u, k).reshape(-1).to(x0.dtype)
        xs = x0.repeat_interleave(k, dim=0)
        scope = (
            self.schedule.variance_gradient(b * k)
            if self.schedule is not None
            else contextlib.nullcontext()
        )
        with scope as holder:
            diff = (
                diffusion_samples(
                    self.sde, score_fn, xs, ts, z, t0=self.eps, time_sampling=self.time_sampling
                )
                .reshape(b, k)
                .mean(1)
            )
            prior = prior_kl(self.sde, x0)
            recon = reconstruction(self.sde, x0, self.eps, z0, self.levels, self.data_range)
        per_dim = 1.0 / (x0[0].numel() * math.log(2))
        if holder is not None:  # d(L_diff^2) = 2 L_diff dL_diff for the schedule's shape
            holder.scale = (2 * per_dim * diff.detach()).repeat_interleave(k)
        return (prior.to(diff.dtype) + recon.to(diff.dtype) + diff) * per_dim


class NLLLoss:
    """Maximum likelihood through the probability-flow ODE: -log p(x0) per example, by the
    per-point adaptive solver with the exact divergence, differentiated through the solver's
    steps (`likelihood.log_likelihood(grad=True)`). For point data (D vector-Jacobian products
    per evaluation); mostly for fine-tuning a score model trained by DSM, whose objective only
    bounds the ODE's likelihood (Song, Durkan et al. 2021)."""

    def __init__(self, sde: SDE, eps: float = 1e-5, rtol: float = 1e-4, atol: float = 1e-4):
        self.sde, self.eps, self.rtol, self.atol = sde, eps, rtol, atol

    def __call__(self, score_fn: ScoreFn, x0: torch.Tensor, g: torch.Generator | None = None):
        logp, _ = log_likelihood(
            self.sde, score_fn, x0, rtol=self.rtol, atol=self.atol, eps=self.eps, grad=True
        )
        return -logp


LOSSES = ("dsm", "ssm", "ddpm", "smld", "vlb", "nll")


def default_loss(sde: SDE) -> str:
    """training.loss=auto: vlb for an SDE with a learned schedule (sde=vdm), dsm otherwise."""
    return "vlb" if hasattr(sde, "module") else "dsm"


def make_loss(
    name: str,
    sde: SDE,
    *,
    eps: float = 1e-5,
    likelihood_weighting: bool = False,
    n_projections: int = 1,
    projection: str = "rademacher",
    n_levels: int = 1000,
    levels: int | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    time_samples: int = 2,
    reduce_mean: bool = False,
    noise: str = "uniform_t",
    weighting: str | None = None,
    sigma_data: float = 0.5,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    importance_weights: bool = True,
    nll_tol: float = 1e-4,
):
    """Build a loss by name: dsm, ssm, ddpm, smld, vlb, nll, or auto (`default_loss`). levels and
    data_range (the discrete data's levels and model range) are used by vlb only; nll_tol is the
    ODE's rtol = atol for nll."""
    if name == "auto":
        name = default_loss(sde)
    if name == "nll":
        return NLLLoss(sde, eps, nll_tol, nll_tol)
    if name == "vlb":
        return VLBLoss(sde, levels, data_range, eps, time_samples)
    if name == "dsm":
        loss = DSMLoss(
            sde, eps, likelihood_weighting, noise, weighting, sigma_data, p_mean, p_std,
            importance_weights,
        )  # fmt: skip
    elif name == "ssm":
        loss = SSMLoss(sde, eps, n_projections, projection)
    elif name in ("ddpm", "smld"):
        loss = DiscreteDSMLoss(sde, name, n_levels, eps)
    else:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)}")
    return MeanOverDims(loss) if reduce_mean else loss


class MeanOverDims:
    """score_sde's reduce_mean=True: the squared error averaged over the D data dimensions
    instead of half its sum, i.e. the loss times 2 / D. The minimiser is the same; the gradient's
    scale, and so what gradient clipping and Adam's epsilon do, is that of score_sde's runs."""

    def __init__(self, loss) -> None:
        self.loss = loss

    def __call__(self, score_fn: ScoreFn, x0: torch.Tensor, g: torch.Generator | None = None):
        return self.loss(score_fn, x0, g) * (2.0 / x0[0].numel())
