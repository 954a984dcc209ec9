"""Likelihoods against closed forms: PF-ODE log p(x), Hutchinson, the ELBO and bits/dim.

Figures quoted in comments were measured with the seeds below (float64, one torch thread).
"""

from __future__ import annotations

import math

import pytest
import torch
from closed_form import SDES, GaussianMixture, exact_score, gmm8, make_sde, mixture5d
from torch.distributions import Normal
from torch.nn import functional as F

from likelihood import (
    dequantized_bpd,
    elbo,
    exact_divergence,
    log_likelihood,
    log_likelihood_stats,
)
from likelihood.elbo import TIME_SAMPLERS, neg_log_snr
from sde_lib import SDE

LAWS = {"gmm8": gmm8, "mixture5d": mixture5d}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: one intra-op thread avoids OpenMP oversubscription on shared CPUs
    (measured 70x slower elementwise ops with 2 threads on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(law: GaussianMixture, n: int, seed: int) -> torch.Tensor:
    return law.sample(n, torch.Generator().manual_seed(seed)).double()


def _use_true_prior(sde: SDE, law: GaussianMixture) -> SDE:
    """Replace pi by the exact p_T of `law`, so that only the solver's error remains."""
    score = exact_score(sde, law)
    sde.prior_logp = lambda z: score.log_prob(z, torch.full((z.shape[0],), sde.T).double())
    return sde


# ---------------------------------------------------------------------------------------------
# divergence


def test_exact_divergence_is_the_jacobian_trace_for_any_rank():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 12, generator=gen, dtype=torch.float64) / 3

    def field(x: torch.Tensor) -> torch.Tensor:  # per example, nonlinear, non-symmetric Jacobian
        return torch.tanh(x.flatten(1) @ w).reshape(x.shape) * x

    x = torch.randn(5, 3, 2, 2, generator=gen, dtype=torch.float64)
    v, div = exact_divergence(field, x)
    ref = [torch.autograd.functional.jacobian(field, xi[None]).reshape(12, 12).trace() for xi in x]
    torch.testing.assert_close(v, field(x))
    torch.testing.assert_close(div, torch.stack(ref))


# ---------------------------------------------------------------------------------------------
# PF-ODE log-likelihood


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("law_name", list(LAWS))
def test_ode_log_likelihood_matches_exact_density(law_name, sde_name):
    # Mean |log p_ode - log p_0| over 64 points at rtol = atol = 1e-5 (torchdiffeq / scipy), and
    # mean |torchdiffeq - scipy|:
    #   gmm8:      vp 6.4e-5 / 4.9e-5 (4.3e-5), subvp 3.7e-5 / 3.9e-5 (1.1e-5),
    #              ve 6.2e-4 / 6.2e-4 (2.0e-5)
    #   mixture5d: vp 2.7e-3 / 2.6e-3 (1.5e-4), subvp 2.7e-3 / 2.8e-3 (2.3e-4),
    #              ve 7.6e-3 / 7.6e-3 (7.1e-5)
    # The mixture5d figures are the prior mismatch pi != p_T (its mean m is not 0: for VE,
    # log p_T - log pi ~ x_T . m / sigma_max^2 has sd |m| / sigma_max ~ 9e-3); with the true p_T
    # they drop to ~1e-4 (next test).
    law = LAWS[law_name]()
    sde = make_sde(sde_name)
    x = _data(law, 64, seed=1)
    true = law.log_prob(x)
    logp, nfe = log_likelihood(sde, exact_score(sde, law), x)
    logp_scipy, nfe_scipy = log_likelihood(sde, exact_score(sde, law), x, backend="scipy")
    assert (logp - true).abs().mean() < 1e-2
    assert (logp_scipy - true).abs().mean() < 1e-2
    assert (logp_scipy - logp).abs().mean() < 1e-2
    assert 20 < nfe < 400 and 20 < nfe_scipy < 400


@pytest.mark.parametrize("sde_name", list(SDES))
def test_ode_solver_error_with_true_prior(sde_name):
    # With pi replaced by the exact p_T, mean |error| on mixture5d is 6.9e-5 (vp), 7.7e-5 (subvp),
    # 1.1e-4 (ve) at rtol = atol = 1e-5: the integration, not the prior, is what is measured.
    law = mixture5d()
    sde = _use_true_prior(make_sde(sde_name), law)
    x = _data(law, 32, seed=2)
    logp, _ = log_likelihood(sde, exact_score(sde, law), x)
    assert (logp - law.log_prob(x)).abs().mean() < 1e-3


def test_ode_log_likelihood_is_rank_agnostic():
    # A 4-D Gaussian mixture shown as (B, 1, 2, 2) images; mean |error| 3.6e-5 against log p_0.
    law = GaussianMixture(
        [0.6, 0.4], [[1.0, 0.0, -1.0, 0.5], [-1.0, 0.5, 0.0, 0.0]], 0.1, (1, 2, 2)
    )
    sde = _use_true_prior(make_sde("vp"), law)
    x = _data(law, 16, seed=3)
    assert x.shape == (16, 1, 2, 2)
    logp, _ = log_likelihood(sde, exact_score(sde, law), x)
    assert (logp - law.log_prob(x)).abs().mean() < 1e-3


def _z_scores(est: torch.Tensor, ref: torch.Tensor, se: torch.Tensor) -> tuple[float, float]:
    """(z of the batch mean, largest per-example |z|) for unbiased estimates with errors se."""
    mean_z = (est - ref).mean() / (se.square().sum().sqrt() / len(se))
    return mean_z.abs().item(), ((est - ref) / se).abs().max().item()


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased(probe):
    # 16 points x 256 probes, tight tolerances so that the two solves differ by ~1e-5 while the
    # per-point probe standard errors are 0.08-0.32 (gaussian) and 0.002-0.17 (rademacher); SE of
    # the batch mean 0.035 / 0.016, measured mean differences -0.029 / -0.016 nats, largest |z|
    # 2.3. Batch mean within 3 SE; every point within 4 SE (Bonferroni over 16 points).
    law, sde = gmm8(), make_sde("vp")
    score = exact_score(sde, law)
    x = _data(law, 16, seed=4)
    tol = {"rtol": 1e-6, "atol": 1e-6}
    exact, _ = log_likelihood(sde, score, x, **tol)
    res = log_likelihood_stats(
        sde,
        score,
        x,
        divergence="hutchinson",
        probe=probe,
        n_probes=256,
        generator=torch.Generator().manual_seed(5),
        **tol,
    )
    mean_z, max_z = _z_scores(res.logp, exact, res.stderr)
    assert mean_z < 3 and max_z < 4
    assert (res.stderr > 1e-3).all()  # the check has teeth: the estimator is noisy


def test_gaussian_and_rademacher_probes_agree():
    law, sde = mixture5d(), make_sde("subvp")
    score = exact_score(sde, law)
    x = _data(law, 16, seed=6)
    runs = [
        log_likelihood_stats(
            sde,
            score,
            x,
            divergence="hutchinson",
            probe=p,
            n_probes=128,
            generator=torch.Generator().manual_seed(7),
        )
        for p in ("gaussian", "rademacher")
    ]
    se = (runs[0].stderr.square() + runs[1].stderr.square()).sqrt()
    mean_z, max_z = _z_scores(runs[0].logp, runs[1].logp, se)
    assert mean_z < 3 and max_z < 4


def test_stderr_conventions_and_bad_options():
    law, sde = gmm8(), make_sde("vp")
    score, x = exact_score(sde, law), _data(law, 4, seed=8)
    assert (log_likelihood_stats(sde, score, x, rtol=1e-3, atol=1e-3).stderr == 0).all()
    one = log_likelihood_stats(sde, score, x, divergence="hutchinson", rtol=1e-3, atol=1e-3)
    assert one.stderr is None
    for bad in ({"divergence": "trace"}, {"backend": "jax"}, {"eps": 0.0}):
        with pytest.raises(ValueError):
            log_likelihood(sde, score, x, **bad)
    with pytest.raises(ValueError):
        log_likelihood(sde, score, x, divergence="hutchinson", probe="uniform")
    for backend in ("torchdiffeq", "scipy"):
        with pytest.raises(ValueError):
            log_likelihood(sde, score, x, backend=backend, method="euler")


# ---------------------------------------------------------------------------------------------
# ELBO


@pytest.mark.parametrize("sde_name", list(SDES))
def test_linear_sde_identities_behind_the_elbo(sde_name):
    # The ELBO's closed forms use div f = D dlog(alpha)/dt and g^2 = dsigma^2/dt - 2 dlog(alpha)/dt
    # sigma^2 (the kernel-variance ODE); check both against the SDE's own drift and diffusion.
    sde = make_sde(sde_name)
    t = torch.linspace(0.01, 1.0, 7, dtype=torch.float64)
    dlog_alpha = torch.func.vmap(torch.func.grad(lambda s: sde.alpha_sigma(s[None])[0][0].log()))(t)
    dvar = torch.func.vmap(torch.func.grad(lambda s: sde.alpha_sigma(s[None])[1][0] ** 2))(t)
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    _, div_f = exact_divergence(lambda y: sde.sde(y, t)[0], x)
    _, g = sde.sde(x, t)
    sigma2 = sde.alpha_sigma(t)[1] ** 2
    torch.testing.assert_close(div_f, 3 * dlog_alpha)
    torch.testing.assert_close(g.square(), dvar - 2 * dlog_alpha * sigma2)


@pytest.mark.parametrize("kind", list(TIME_SAMPLERS))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_time_samplers_integrate_over_lambda(sde_name, kind):
    # Each sampler gives (t, w) with E[w h(lambda(t))] = int h d lambda over [lambda_eps, lambda_T].
    # h = sigmoid(lambda) and its derivative, the bump sigmoid(lambda) sigmoid(-lambda) centred at
    # SNR = 1, integrate to differences of softplus and sigmoid. 1e5 draws: SE 0.2-0.7% of the
    # integral; within 4 SE.
    sde = make_sde(sde_name)
    eps = 1e-5
    lam_eps, lam_T = neg_log_snr(sde, torch.tensor([eps, sde.T], dtype=torch.float64))
    t, w = TIME_SAMPLERS[kind](sde, 100_000, eps, torch.Generator().manual_seed(20))
    lam = neg_log_snr(sde, t)
    assert (t >= eps).all() and (t <= sde.T).all()
    cases = [
        (torch.sigmoid(lam), F.softplus(lam_T) - F.softplus(lam_eps)),
        (torch.sigmoid(lam) * torch.sigmoid(-lam), torch.sigmoid(lam_T) - torch.sigmoid(lam_eps)),
    ]
    for h, integral in cases:
        v = w * h
        se = v.std() / math.sqrt(len(v))
        assert se < 0.01 * integral
        assert (v.mean() - integral).abs() < 4 * se


def _gaussian_cross_entropy(x, alpha, sigma, mean, var):
    """E_{y ~ N(alpha x, sigma^2 I)}[-log N(y; mean, var I)] per example."""
    d = x.shape[1]
    sq = (alpha * x - mean).square().sum(1) + d * sigma**2
    return 0.5 * d * math.log(2 * math.pi * var) + sq / (2 * var)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("mean,var", [(0.0, 1.0), (0.5, 0.25)])
def test_elbo_is_tight_for_gaussian_data(sde_name, mean, var):
    # For data N(m, v I) with its exact score the bound equals, per point, the cross-entropy at eps
    # plus the prior mismatch E[log p_T(x_T) - log pi(x_T)] (both Gaussian closed forms).
    # N(0, I) is the control variate's own law, so there the estimate has no variance at all;
    # for N(0.5, 0.25 I) the batch-mean gap is within 3 SE (SE of the mean 0.015 nats).
    eps = 1e-5
    sde = make_sde(sde_name)
    law = GaussianMixture([1.0], [[mean, -mean]], var)
    x = _data(law, 32, seed=10)
    m = law.means[0]
    ends = sde.alpha_sigma(torch.tensor([eps, sde.T], dtype=torch.float64))
    (a0, aT), (s0, sT) = ends
    s2 = sde.prior_std() ** 2
    target = (
        _gaussian_cross_entropy(x, a0, s0, a0 * m, a0**2 * var + s0**2)
        - _gaussian_cross_entropy(x, aT, sT, aT * m, aT**2 * var + sT**2)
        + _gaussian_cross_entropy(x, aT, sT, torch.zeros_like(m), s2)
    )
    gen = torch.Generator().manual_seed(11)
    bound, se = elbo(sde, exact_score(sde, law), x, n_samples=2048, eps=eps, generator=gen)
    if var == 1.0 and mean == 0.0:
        torch.testing.assert_close(bound, target, rtol=0, atol=1e-8)
        assert (se < 1e-8).all()
    else:
        mean_z, _ = _z_scores(bound, target, se)
        assert mean_z < 3


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("law_name", list(LAWS))
def test_elbo_bounds_the_true_nll(law_name, sde_name):
    # With the exact score the bound is tight per point (up to pi != p_T, < 1e-2 nats), so the
    # estimate straddles -log p_0(x). Measured over 32 points x 4096 samples: batch-mean gap
    # (bound - nll) from -0.024 to +0.009 nats, SE of the batch mean 0.021-0.032, per-point SE
    # 0.10-0.21, lowest per-point z -2.8. The batch mean is not below the NLL by more than 3 SE,
    # no point is below by more than 4 SE (Bonferroni over 32 points), and the gap is within
    # 3 SE + 0.01 of zero.
    law = LAWS[law_name]()
    sde = make_sde(sde_name)
    x = _data(law, 32, seed=12)
    nll = -law.log_prob(x)
    gen = torch.Generator().manual_seed(13)
    bound, se = elbo(sde, exact_score(sde, law), x, n_samples=4096, generator=gen)
    gap = bound - nll
    se_mean = se.square().sum().sqrt() / len(se)
    assert gap.mean() > -3 * se_mean
    assert (gap / se).min() > -4
    assert gap.mean().abs() < 3 * se_mean + 1e-2
    assert se_mean < 0.04


def test_elbo_time_samplings_agree():
    # Mixed (default), logistic and uniform lambda and uniform t estimate the same bound: each
    # alternative is within 3 SE of the default for the batch mean and 4 SE per point.
    law, sde = gmm8(), make_sde("ve")
    x = _data(law, 16, seed=14)
    (ref, ref_se), *others = [
        elbo(
            sde,
            exact_score(sde, law),
            x,
            n_samples=2048,
            time_sampling=kind,
            generator=torch.Generator().manual_seed(15),
        )
        for kind in ("mixed", "logistic", "log_snr", "uniform")
    ]
    for bound, se in others:
        mean_z, max_z = _z_scores(bound, ref, (se.square() + ref_se.square()).sqrt())
        assert mean_z < 3 and max_z < 4
    with pytest.raises(ValueError):
        elbo(sde, exact_score(sde, law), x, n_samples=8, time_sampling="cosine")


# ---------------------------------------------------------------------------------------------
# bits per dimension


@pytest.mark.parametrize("levels,lo,hi", [(17, 0.0, 1.0), (256, -1.0, 1.0)])
def test_bpd_of_the_uniform_density_is_log2_levels(levels, lo, hi):
    # p_x uniform on [lo, hi]^D gives P(k) = L^-D exactly, so bpd = log2 L.
    d = 6
    k = torch.randint(0, levels, (8, d), generator=torch.Generator().manual_seed(16))

    def uniform(x: torch.Tensor) -> torch.Tensor:
        assert ((x >= lo) & (x < hi)).all()
        return torch.full((x.shape[0],), -d * math.log(hi - lo), dtype=x.dtype)

    bpd = dequantized_bpd(uniform, k, levels=levels, lo=lo, hi=hi)
    torch.testing.assert_close(bpd, torch.full_like(bpd, math.log2(levels)))


@pytest.mark.parametrize("levels", [17, 256])
def test_bpd_of_a_discretised_gaussian(levels):
    # Model: u ~ N(0.5, 0.15^2) per coordinate on [0, 1], data scaled to [-1, 1]. The bound has
    # the closed form E_U[log N((k+U)/L)] = log N(c) - 1 / (24 L^2 s^2), c = (k + 1/2) / L, and
    # lies above the exact -log2 P(k) / D (P(k) from the normal CDF) by the Jensen gap, to
    # leading order sum_i (c_i - mu)^2 / (24 L^2 s^4) / (D ln 2): up to 3.5e-2 bits for L = 17,
    # 1.2e-4 for L = 256; the next order (measured 3.3e-4 and 4e-9 bits) is O(L^-4).
    d, mu, s = 2, 0.5, 0.15
    normal = Normal(torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    grid = torch.linspace(levels / 4, 3 * levels / 4, 9).round().long()
    k = torch.cartesian_prod(grid, grid)  # (81, 2): cells from the centre to 1.7 sd out
    c = (k.double() + 0.5) / levels
    closed = -(normal.log_prob(c) - 1 / (24 * levels**2 * s**2) - math.log(levels)).sum(1)
    closed = closed / (d * math.log(2))
    cell = normal.cdf((k.double() + 1) / levels) - normal.cdf(k.double() / levels)
    exact = -cell.log2().sum(1) / d
    jensen = ((c - mu).square() / (24 * levels**2 * s**4)).sum(1) / (d * math.log(2))
    assert (closed >= exact).all()
    torch.testing.assert_close(closed - exact, jensen, rtol=0, atol=60 / levels**4)

    def log_p_x(x: torch.Tensor) -> torch.Tensor:  # x = 2 u - 1, so p_x = p_u / 2 per coordinate
        return (normal.log_prob((x + 1) / 2) - math.log(2)).sum(1)

    gen = torch.Generator().manual_seed(17)
    bpd = dequantized_bpd(log_p_x, k, levels=levels, lo=-1.0, hi=1.0, n_draws=1000, generator=gen)
    # Monte Carlo over 1000 draws, whose spread scales as 1/L: measured max |bpd - closed|
    # 1.4e-2 (L = 17) and 7.6e-4 (L = 256) bits, mean 4.5e-4 and 1.9e-5.
    assert (bpd - closed).abs().max() < 0.03 * 17 / levels
    assert (bpd - closed).mean().abs() < 2e-3 * 17 / levels


def test_bpd_through_the_ode_on_digit_like_data():
    # 17-level data in [0, 1]^2 under a 2-component Gaussian mixture with its exact score: bits/dim
    # through the PF ODE equals bits/dim from the exact density for the same dequantisation draws.
    law = GaussianMixture([0.5, 0.5], [[0.3, 0.6], [0.7, 0.4]], 0.01)
    levels = 17
    k = (_data(law, 32, seed=18) * levels).floor().clamp(0, levels - 1).long()
    sde = make_sde("subvp")
    score = exact_score(sde, law)

    def ode_logp(x: torch.Tensor) -> torch.Tensor:
        return log_likelihood(sde, score, x)[0]

    opts = {"levels": levels, "n_draws": 2}
    via_ode = dequantized_bpd(ode_logp, k, generator=torch.Generator().manual_seed(19), **opts)
    exact = dequantized_bpd(law.log_prob, k, generator=torch.Generator().manual_seed(19), **opts)
    assert (via_ode - exact).abs().mean() < 1e-2 / (2 * math.log(2))


def test_a_nearly_zero_field_integrates_exactly():
    """An untrained network's field is ~0. torchdiffeq then probes its first step far beyond
    T, where VE's coefficients overflow (sigma(300) = inf); the solver must not see that.
    Closed form for the linear score s(x) = -c x on VE: the PF-ODE is dx/dt = 1/2 g^2 c x, so
    x_T = x exp(c/2 (sigma_T^2 - sigma_eps^2)) and log p(x) = log p_T(x_T) + c D/2 (sigma_T^2 -
    sigma_eps^2), with g^2 = d sigma^2 / dt (sigma(t) = sigma_min r^t, score_sde's level)."""
    from sde_lib import VESDE

    sde, c, eps = VESDE(0.02, 100.0), 1e-4, 1e-5
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logp, _ = log_likelihood(sde, lambda y, t: -c * y, x, rtol=1e-8, atol=1e-8, eps=eps)
    # the SDE's g^2 integrates to sigma(t)^2 - sigma_min^2 (its exact kernel variance)
    var = lambda t: sde.marginal_prob(x, torch.full((3,), t, dtype=x.dtype))[1] ** 2  # noqa: E731
    grow = 0.5 * c * (var(1.0) - var(eps))
    x_t = x * grow.exp()[:, None, None, None]
    want = sde.prior_logp(x_t) + grow * x[0].numel()
    assert torch.allclose(logp, want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# per-point solves


def test_a_points_log_p_does_not_depend_on_its_batch():
    """backend=perpoint (each point its own step size and error control): a point's log p alone,
    in a batch of 256 and in a batch of 128 agrees to 1e-12 nats (float64, exact mix5d score;
    measured <= 4e-15: the rounding of the score on another number of rows). With one step size
    per batch (torchdiffeq) the same points moved by up to 6e-3 nats (measured 2e-3 mean)."""
    sde, law = make_sde("vp"), mixture5d()
    score = exact_score(sde, law)
    x = _data(law, 256, seed=21)
    lone = [0, 131, 254, 255]

    def moves(backend: str) -> float:
        full = log_likelihood(sde, score, x, backend=backend)[0]
        halves = torch.cat(
            [log_likelihood(sde, score, h, backend=backend)[0] for h in x.split(128)]
        )
        alone = torch.cat(
            [log_likelihood(sde, score, x[i : i + 1], backend=backend)[0] for i in lone]
        )
        return max(float((halves - full).abs().max()), float((alone - full[lone]).abs().max()))

    assert moves("perpoint") <= 1e-12
    assert moves("torchdiffeq") > 1e-4


def test_per_point_solver_orders_and_independence():
    """sde_lib.rk on y' = -k y with a different k per row (the rows' stiffness spans 500x): each
    row meets its tolerance (error <= 10 tol), takes its own number of steps (the mild rows far
    fewer than the stiff one), and tightening the tolerance 100x shrinks the error at least 30x
    (measured 221x with dopri5, 157x with bosh3: the error follows the tolerance); backwards in
    time too; a row alone is bitwise the row in the batch."""
    from sde_lib.rk import solve_per_point

    k = torch.tensor([0.1, 1.0, 10.0, 50.0], dtype=torch.float64)
    y0 = torch.cat([torch.ones(4, 3, dtype=torch.float64), k[:, None]], 1)

    def f(t, y, rows):
        return torch.cat([-y[:, 3:] * y[:, :3], torch.zeros_like(y[:, 3:])], 1)

    for method in ("dopri5", "bosh3"):
        errs = []
        for tol in (1e-5, 1e-7):
            sol = solve_per_point(f, y0, 0.0, 1.0, rtol=tol, atol=tol, method=method)
            err = (sol.y1[:, :3] - torch.exp(-k)[:, None]).abs().amax(1)
            assert float(err.max()) <= 10 * tol, (method, tol, err)
            assert int(sol.nfe[0]) * 4 < int(sol.nfe[3])
            errs.append(float(err[1:].max()))
        assert errs[0] / errs[1] > 30, (method, errs)
    back = solve_per_point(f, y0, 1.0, 0.0, rtol=1e-9, atol=1e-12)  # backwards in time
    rel = (back.y1[:, 0] - torch.exp(k)).abs() / torch.exp(k)
    assert float(rel.max()) < 1e-6
    alone = solve_per_point(f, y0[2:3], 0.0, 1.0)
    together = solve_per_point(f, y0, 0.0, 1.0)
    assert torch.equal(alone.y1[0], together.y1[2]) and int(alone.nfe[0]) == int(together.nfe[2])


# ---------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("backend", ["perpoint", "torchdiffeq"])
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_log_p_gradients_are_exact(backend, sde_name):
    """A Gaussian model with parameters theta = (m, log w): the score of N(alpha m, alpha^2 w +
    sigma^2) at every t. Its PF-ODE is linear, x_T = alpha_T m + sqrt(V_T / V_eps) (x - alpha_eps
    m) with V_t = alpha_t^2 w + sigma_t^2, so log p(x) = log pi(x_T) + 1/2 sum log(V_T / V_eps)
    in closed form. grad=True gives d log p / d theta and d log p / d x of that closed form
    within 1e-6 relative (float64, tolerance 1e-10)."""
    sde = make_sde(sde_name)
    gen = torch.Generator().manual_seed(22)
    m = (torch.randn(3, generator=gen, dtype=torch.float64) * 0.5).requires_grad_(True)
    log_w = (torch.randn(3, generator=gen, dtype=torch.float64) * 0.3).requires_grad_(True)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    eps = 1e-3

    def variance(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = (v[:, None] for v in sde.alpha_sigma(t))
        return alpha, alpha.square() * log_w.exp() + sigma.square()

    def score(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, v = variance(t)
        return -(y - alpha * m) / v

    logp, _ = log_likelihood(sde, score, x, rtol=1e-10, atol=1e-10, eps=eps, backend=backend,
                             grad=True)  # fmt: skip
    got = torch.autograd.grad(logp.sum(), (m, log_w, x))

    ends = lambda t: torch.full((5,), t, dtype=torch.float64)  # noqa: E731
    a0, v0 = variance(ends(eps))
    a1, v1 = variance(ends(sde.T))
    x_T = a1 * m + (v1 / v0).sqrt() * (x - a0 * m)
    closed = sde.prior_logp(x_T) + 0.5 * (v1 / v0).log().sum(1)
    want = torch.autograd.grad(closed.sum(), (m, log_w, x))
    torch.testing.assert_close(logp.detach(), closed.detach(), rtol=1e-8, atol=1e-8)
    for g, w in zip(got, want, strict=True):
        assert float((g - w).abs().max() / w.abs().max()) < 1e-6


def test_grad_with_the_scipy_backend_is_refused():
    sde, law = make_sde("vp"), gmm8()
    with pytest.raises(ValueError, match="grad=True needs backend perpoint or torchdiffeq"):
        log_likelihood(sde, exact_score(sde, law), _data(law, 2, 0), backend="scipy", grad=True)


# ---------------------------------------------------------------------------------------------
# log-density of samples


@pytest.mark.parametrize("sde_name", ["vp", "ve", "subvp"])
def test_samples_come_with_their_exact_log_density(sde_name):
    """sample_log_density: PF-ODE samples from the exact gmm8 score and each sample's log-density
    integrated alongside match the exact log p_eps of the sample (mean error <= 1e-3 nats, max
    <= 1e-2; measured mean 7e-5 / 6e-4 / 4e-5) and log_likelihood's value on the same points,
    integrated the other way (mean <= 1e-3; measured 6e-5 / 1.1e-4 / 6e-5)."""
    from likelihood import sample_log_density
    from samplers import sample_ode

    sde, law = make_sde(sde_name), gmm8()
    score = exact_score(sde, law)
    x_T = sde.prior_sampling((300, 2), generator=torch.Generator().manual_seed(23)).double()
    r = sample_log_density(sde, score, x_T, eps=1e-3)
    exact = score.log_prob(r.x, torch.full((300,), 1e-3, dtype=torch.float64))
    back, _ = log_likelihood(sde, score, r.x, eps=1e-3)
    assert float((r.logp - exact).abs().mean()) <= 1e-3
    assert float((r.logp - exact).abs().max()) <= 1e-2
    assert float((r.logp - back).abs().mean()) <= 1e-3
    # the same flow as sampler=ode, with other steps (the density's error counts too)
    x_only = sample_ode(sde, score, x_T, eps=1e-3)
    assert float((x_only - r.x).abs().max()) < 1e-2  # measured 1.3e-3


def test_sample_mode_writes_each_samples_log_density(tmp_path):
    """run.py mode=sample sampler=ode sampler.logp=true: samples.npz holds logp_model_space, equal
    to what the API gives for the same prior draws; options that cannot give it are one line."""
    import numpy as np
    from runs import compose_cfg, run_mode

    from likelihood import sample_log_density
    from sde_lib.errors import UserError
    from tasks.sample import sample_noise
    from tasks.validate import validate

    args = ("mode=sample", "model=exact", "sampler=ode", "sampler.logp=true",
            "sampler.denoise=false", "sampler.n_samples=24", "sampler.batch_size=10")  # fmt: skip
    _, out = run_mode(tmp_path, "logp", *args)
    saved = np.load(out / "samples.npz")
    sde, law = make_sde("vp"), gmm8()
    got = []
    for start in range(0, 24, 10):  # the run's batches, each its own keyed noise
        idx = torch.arange(start, min(start + 10, 24))
        noise = sample_noise(0, idx)
        x_T = sde.prior_sampling((len(idx), 2), generator=noise)
        got.append(sample_log_density(sde, exact_score(sde, law), x_T, eps=1e-3).logp)
    np.testing.assert_allclose(saved["logp_model_space"], torch.cat(got).numpy(), rtol=1e-5)
    for bad, words in ((["sampler.denoise=true"], "set sampler.denoise=false"),
                       (["sampler.method=rk4", "sampler.steps=10"], "sampler.method in dopri5"),
                       (["sampler.divergence=foo"], "sampler.divergence='foo'")):  # fmt: skip
        with pytest.raises(UserError, match=words):
            validate(compose_cfg(tmp_path, *args, *bad))


# ---------------------------------------------------------------------------------------------
# dequantisation bounds


def _cells(mix: GaussianMixture, n: int, levels: int, lo: float, hi: float, seed: int):
    """n points of mix binned into `levels` cells per coordinate on [lo, hi] (the end cells
    extend to infinity) and their exact -log P(cell) from the components' normal CDFs."""
    from test_vdm import _binned_log_pmf

    delta = (hi - lo) / levels
    edges = lo + delta * torch.arange(levels + 1, dtype=torch.float64)
    edges[0], edges[-1] = -math.inf, math.inf
    raw = _data(mix, n, seed)
    k = ((raw - lo) / delta).floor().long().clamp(0, levels - 1)
    return k, -_binned_log_pmf(mix, k, edges)


@pytest.mark.parametrize("kind", ["uniform", "truncated_normal"])
def test_dequantized_bounds_hold_and_tighten_with_k(kind):
    """On mix5d's first two coordinates binned to 16 cells on [-3, 3], with the exact density:
    every bound on -log P(k) lies above the exact discrete NLL (cell masses) within 3 standard
    errors and falls as K grows (1 -> 4 -> 16, each step by more than 2 standard errors of the
    paired difference; measured uniform 0.135 -> 0.033 -> 0.012 nats above the exact NLL,
    truncated normal with s = delta 0.133 -> 0.036 -> 0.012)."""
    from likelihood.dequantization import dequantized_log_prob

    full = mixture5d()
    mix = GaussianMixture(full.weights, full.means[:, :2], full.variances[:, :2])
    levels, lo, hi = 16, -3.0, 3.0
    k, exact = _cells(mix, 600, levels, lo, hi, seed=24)
    gaps = []
    for K in (1, 4, 16):
        bound = -dequantized_log_prob(
            mix.log_prob, k, levels=levels, lo=lo, hi=hi, kind=kind, std=(hi - lo) / levels,
            importance_samples=K, generator=torch.Generator().manual_seed(25),
        )  # fmt: skip
        gap = bound - exact
        gaps.append(gap)
        assert float(gap.mean()) > -3 * float(gap.std()) / math.sqrt(len(gap)), (K, gap.mean())
    for looser, tighter in zip(gaps, gaps[1:], strict=False):
        diff = looser - tighter
        assert float(diff.mean()) > 2 * float(diff.std()) / math.sqrt(len(diff))


def test_truncated_normal_dequantization_fits_data_seen_through_noise():
    """Data as a diffusion model sees them at its first time: cell centres plus N(0, s^2) noise
    with s an eighth of a cell (8 levels on [-1, 1]^2, a mixture over a few centres). The
    truncated normal with that s is tight (it is the law of the point given its cell where the
    neighbours' tails are negligible; measured 2e-16 nats from the exact discrete NLL) where the
    uniform one is loose (3.06 nats); both stay bounds."""
    from likelihood.dequantization import dequantized_log_prob

    levels, lo, hi = 8, -1.0, 1.0
    delta = (hi - lo) / levels
    cells = torch.tensor([[1, 2], [5, 5], [3, 6], [6, 1]], dtype=torch.float64)
    s = delta / 8
    mix = GaussianMixture(torch.tensor([0.4, 0.3, 0.2, 0.1]), lo + (cells + 0.5) * delta, s**2)
    k, exact = _cells(mix, 400, levels, lo, hi, seed=26)
    gap = {}
    for kind in ("uniform", "truncated_normal"):
        gen = torch.Generator().manual_seed(27)
        bound = -dequantized_log_prob(
            mix.log_prob, k, levels=levels, lo=lo, hi=hi, kind=kind, std=s, generator=gen
        )
        g = bound - exact
        assert float(g.mean()) > -3 * float(g.std()) / math.sqrt(len(g)) - 1e-12
        gap[kind] = float(g.mean())
    assert gap["truncated_normal"] < 0.05 and gap["uniform"] > 0.5, gap


def test_truncated_normal_centred_at_the_data_values():
    """Digits-like levels: L = 8 values at lo + k (hi - lo) / (L - 1), each inside (not at the
    centre of) its cell of width (hi - lo) / L, seen through noise s = cell / 16. Centred at the
    data values (as mode=nll does) the truncated normal stays a bound and is far tighter than the
    uniform one."""
    from likelihood.dequantization import dequantized_log_prob

    levels, lo, hi = 8, -1.0, 1.0
    delta = (hi - lo) / levels
    values = lo + torch.arange(levels, dtype=torch.float64) * (hi - lo) / (levels - 1)
    cells = torch.tensor([[2, 3], [5, 4], [3, 5]])  # values >= 4.6 s from their cells' ends
    s = delta / 16
    mix = GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), values[cells], s**2)
    k, exact = _cells(mix, 400, levels, lo, hi, seed=28)
    gap = {}
    for kind in ("uniform", "truncated_normal"):
        bound = -dequantized_log_prob(
            mix.log_prob, k, levels=levels, lo=lo, hi=hi, kind=kind, std=s, centre=values[k],
            generator=torch.Generator().manual_seed(29),
        )  # fmt: skip
        g = bound - exact
        assert float(g.mean()) > -3 * float(g.std()) / math.sqrt(len(g)) - 1e-12
        gap[kind] = float(g.mean())
    assert gap["truncated_normal"] < 0.1 < 1.0 < gap["uniform"], gap
