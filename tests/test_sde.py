"""sde_lib against closed form: marginals, prior, discretisations, reverse SDE and exact scores."""

from __future__ import annotations

import math

import pytest
import torch
from closed_form import SDES, exact_score, gmm8, make_sde, mixture5d
from scipy import stats

from sde_lib import VESDE, VPSDE, append_dims, subVPSDE


def simulate_forward(
    sde,
    x0: torch.Tensor,
    t_end: float,
    n_steps: int,
    g: torch.Generator,
    record: tuple[float, ...] = (),
) -> dict[float, torch.Tensor]:
    """Euler-Maruyama simulation of the forward SDE from x0 to t_end, float64: {t: x_t} at t_end
    and at the grid times nearest to each time of `record` (one path serves every time)."""
    x = x0.double().clone()
    dt = t_end / n_steps
    at = {round(t / dt): t for t in record}
    out = {}
    for i in range(n_steps):
        t = torch.full((x.shape[0],), i * dt, dtype=torch.float64)
        f, gdiff = sde.sde(x, t)
        x = (
            x
            + f * dt
            + append_dims(gdiff, x.ndim)
            * math.sqrt(dt)
            * torch.randn(x.shape, generator=g, dtype=torch.float64)
        )
        if i + 1 in at:
            out[at[i + 1]] = x
    out[t_end] = x
    return out


@pytest.mark.parametrize("name", list(SDES))
def test_marginal_matches_euler_maruyama_moments(name):
    """One Euler-Maruyama path set (n = 20 000, 2000 steps to t = 1) checked at t = 0.3 and 1:
    the same paths serve both times (0.3 is step 600), at half the cost of two simulations."""
    sde = make_sde(name)
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.tensor([[1.5, -0.5]]).expand(n, 2)
    paths = simulate_forward(sde, x0, 1.0, 2000, g, record=(0.3,))
    for t_end, xt in paths.items():
        mean, std = sde.marginal_prob(x0[:1].double(), torch.tensor([t_end], dtype=torch.float64))
        emp_mean, emp_std = xt.mean(0), xt.std(0)
        # mean: within 4 Monte-Carlo standard errors (+1e-3 for the EM bias of 2000 steps)
        se = std / math.sqrt(n)
        assert torch.all((emp_mean - mean[0]).abs() <= 4 * se + 1e-3), (t_end, emp_mean, mean)
        # std: MC relative SE of a std is 1/sqrt(2n) = 0.5 %; allow 2.5 % (EM bias included)
        assert torch.allclose(emp_std, std.expand(2), rtol=0.025), (t_end, emp_std, std)


@pytest.mark.parametrize("name", list(SDES))
def test_prior_logp_is_gaussian_density(name):
    sde = make_sde(name)
    z = sde.prior_sampling((64, 3, 2, 2), generator=torch.Generator().manual_seed(1))
    s = sde.prior_std()
    ref = stats.norm(0, s).logpdf(z.flatten(1).double().numpy()).sum(1)
    assert torch.allclose(sde.prior_logp(z).double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-4)
    assert z.std().item() == pytest.approx(s, rel=0.1)


def test_vp_discretize_is_ddpm_step():
    sde = VPSDE()
    n = 1000
    grid = torch.arange(n + 1, dtype=torch.float64) / n
    alpha_bar = sde.alpha_sigma(grid)[0].square()
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]  # DDPM: alpha_bar_i = prod_j (1 - beta_j)
    x = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f, G = sde.discretize(x, grid[:-1], 1 / n)
    assert torch.allclose(f, append_dims((1 - betas).sqrt() - 1, 4) * x, atol=1e-12)
    assert torch.allclose(G, betas.sqrt(), atol=1e-12)
    # beta is linear in t, so 1 - beta_i = exp(-int beta) = exp(-beta(midpoint) / N) exactly, and
    # to first order beta_i = beta(t) / N: DDPM's linear schedule from 1e-4 to 0.02
    mid = (grid[:-1] + grid[1:]) / 2
    assert torch.allclose(betas, -torch.expm1(-sde.beta(mid) / n), rtol=1e-9)
    assert torch.allclose(betas, sde.beta(mid) / n, rtol=0.011)
    assert betas[0].item() == pytest.approx(1e-4, rel=0.11)  # beta(0.5/N)/N = 1.1e-4
    assert betas[-1].item() == pytest.approx(0.02, rel=0.011)  # 1 - exp(-beta(1 - 0.5/N)/N)


def test_ve_discretize_is_smld_step():
    sde = VESDE()
    n = 100
    grid = torch.arange(n + 1, dtype=torch.float64) / n
    x = torch.randn(n, 2, dtype=torch.float64)
    f, G = sde.discretize(x, grid[:-1], 1 / n)
    sigmas = sde.sigma(grid)
    assert torch.equal(f, torch.zeros_like(x))
    assert torch.allclose(G.square(), sigmas[1:].square() - sigmas[:-1].square(), rtol=1e-10)


@pytest.mark.parametrize("name", list(SDES))
def test_discretize_composes_to_the_marginal(name):
    """The discrete chain has exactly the continuous marginals at the grid times."""
    sde = make_sde(name)
    n = 50
    a, var = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    for i in range(n):
        f, G = sde.discretize(one, torch.tensor([i / n], dtype=torch.float64), 1 / n)
        ratio = 1 + f[0, 0]
        a, var = a * ratio, var * ratio**2 + G.square()
    alpha, sigma = sde.alpha_sigma(torch.tensor([1.0], dtype=torch.float64))
    assert torch.allclose(a, alpha, rtol=1e-9) and torch.allclose(var.sqrt(), sigma, rtol=1e-9)


@pytest.mark.parametrize("name", list(SDES))
def test_reverse_sde_and_probability_flow_drifts(name):
    sde = make_sde(name)
    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.9 + 0.05
    score = lambda x, t: -x  # noqa: E731
    f, g = sde.sde(x, t)
    drift, diff = sde.reverse(score).sde(x, t)
    assert torch.allclose(drift, f + append_dims(g**2, 2) * x) and torch.equal(diff, g)
    drift, diff = sde.reverse(score, probability_flow=True).sde(x, t)
    assert torch.allclose(drift, f + 0.5 * append_dims(g**2, 2) * x) and torch.all(diff == 0)
    rev_f, rev_G = sde.reverse(score).discretize(x, t, 0.01)
    fwd_f, fwd_G = sde.discretize(x, t - 0.01, 0.01)
    assert torch.allclose(rev_f, fwd_f - append_dims(fwd_G**2, 2) * (-x))
    assert torch.allclose(rev_G, fwd_G)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(beta_min=30, beta_max=20)
    with pytest.raises(ValueError, match="sigma_min"):
        VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="beta_min"):
        subVPSDE(beta_min=-1)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("law", ["gmm8", "mixture5d"])
def test_exact_score_is_gradient_of_exact_log_density(name, law):
    sde = make_sde(name)
    mixture = gmm8() if law == "gmm8" else mixture5d()
    model = exact_score(sde, mixture)
    g = torch.Generator().manual_seed(3)
    for t_val in (1e-3, 0.1, 0.5, 1.0):
        t = torch.full((64,), t_val, dtype=torch.float64)
        alpha, sigma = sde.alpha_sigma(t)
        x = append_dims(alpha, 2) * mixture.sample(64, generator=g).double() + append_dims(
            sigma, 2
        ) * torch.randn(64, mixture.dim, generator=g, dtype=torch.float64)
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(model.log_prob(x, t).sum(), x)
        assert torch.allclose(model(x.detach(), t), grad, rtol=1e-8, atol=1e-8)


def test_exact_log_density_matches_scipy_and_integrates_to_one():
    mixture = gmm8()
    x = torch.randn(100, 2, dtype=torch.float64) * 2
    ref = sum(
        float(w) * stats.multivariate_normal(m.numpy(), v.numpy()).pdf(x.numpy())
        for w, m, v in zip(mixture.weights, mixture.means, mixture.variances)
    )
    assert torch.allclose(mixture.log_prob(x), torch.from_numpy(ref).log(), rtol=1e-10)
    # perturbed by VE at t = 0.5: a Riemann sum over a grid integrates to 1
    sde = VESDE()
    lin = torch.linspace(-6, 6, 401, dtype=torch.float64)
    grid = torch.cartesian_prod(lin, lin)
    t = torch.full((grid.shape[0],), 0.5, dtype=torch.float64)
    mass = exact_score(sde, mixture).log_prob(grid, t).exp().sum() * (lin[1] - lin[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=2e-3)


def test_rank_agnostic_on_images():
    for sde in (VPSDE(), subVPSDE(), VESDE()):
        x = torch.randn(4, 3, 8, 8)
        t = torch.rand(4)
        mean, std = sde.marginal_prob(x, t)
        f, g = sde.sde(x, t)
        fd, G = sde.discretize(x, t, 0.01)
        assert mean.shape == f.shape == fd.shape == x.shape and std.shape == g.shape == G.shape == (
            4,
        )
