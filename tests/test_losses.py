"""Losses against closed form: the exact score minimises every objective."""

from __future__ import annotations

import math

import pytest
import torch
from closed_form import SDES, exact_score, gmm8, make_sde, mixture5d

from sde_lib import append_dims
from training.losses import make_loss


def _perturbed(score_fn, sde, direction: torch.Tensor, delta: float):
    """score + delta * h(x, t) / sigma(t), a smooth perturbation at the score's own scale."""

    def fn(x, t):
        sigma = sde.alpha_sigma(t)[1].to(x.dtype)
        h = torch.tanh(x.flatten(1) @ direction).reshape(x.shape)
        return score_fn(x, t) + delta * h / append_dims(sigma, x.ndim)

    return fn


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize(
    "loss_name,opts",
    [
        ("dsm", {}),
        ("dsm", {"likelihood_weighting": True}),
        ("ssm", {"n_projections": 2}),
        ("ssm", {"projection": "gaussian"}),
        ("ddpm", {}),
        ("smld", {}),
    ],
)
def test_exact_score_minimises_the_loss(name, loss_name, opts):
    sde = make_sde(name)
    mixture = mixture5d()
    score = exact_score(sde, mixture)
    loss = make_loss(loss_name, sde, eps=1e-3, **opts)
    x0 = mixture.sample(20000, generator=torch.Generator().manual_seed(0)).double()
    gen = torch.Generator().manual_seed(7)
    directions = torch.randn(4, mixture.dim, mixture.dim, generator=gen, dtype=torch.float64)

    def value(fn):  # common random numbers: the same t, z and probes for every candidate
        return loss(fn, x0, torch.Generator().manual_seed(1)).mean().item()

    best = value(score)
    for direction in directions:
        for delta in (0.3, 0.1, -0.1):
            worse = value(_perturbed(score, sde, direction, delta))
            assert worse > best, (loss_name, delta, worse, best)


def test_dsm_value_at_exact_score_matches_closed_form_on_a_gaussian():
    """For x0 ~ N(0, I): E_x0,z |sigma s*(x_t) + z|^2 / 2 = D/2 * E_t[1 - sigma^2 / (a^2 + s^2)]."""
    sde = make_sde("vp")
    gauss = gmm8(radius=0.0, std=1.0)  # eight coincident unit Gaussians = N(0, I)
    loss = make_loss("dsm", sde, eps=1e-3)
    x0 = gauss.sample(200000, generator=torch.Generator().manual_seed(0)).double()
    got = loss(exact_score(sde, gauss), x0, torch.Generator().manual_seed(1)).mean().item()
    t = torch.linspace(1e-3, 1, 100001, dtype=torch.float64)
    a, s = sde.alpha_sigma(t)
    expected = (2 / 2 * (1 - s**2 / (a**2 + s**2))).mean().item()
    assert got == pytest.approx(expected, rel=0.01)


def test_loss_shapes_and_names():
    sde = make_sde("ve")
    x0 = torch.randn(6, 1, 4, 4)
    for name in ("dsm", "ssm", "ddpm", "smld"):
        v = make_loss(name, sde)(lambda x, t: -x, x0, torch.Generator().manual_seed(0))
        assert v.shape == (6,) and torch.isfinite(v).all()
    with pytest.raises(ValueError, match="allowed"):
        make_loss("nope", sde)


# (sde, noise, p_mean, p_std): proposals that cover the SDE's ln(sigma / alpha) range (sub-VP:
# -13.8 .. 5) within a few of their standard deviations; EDM's N(-1.2, 1.2^2) puts ln s(eps) ten
# of them away there, and its weights' variance is then effectively infinite (a sample mean
# misses the rare huge weights), which is why EDM's recipe takes the proposal's own expectation
PROPOSALS = [
    ("vp", "lognormal", -1.2, 1.2),
    ("vp", "logsnr_uniform", 0.0, 1.0),
    ("subvp", "lognormal", -3.0, 3.0),
    ("subvp", "logsnr_uniform", 0.0, 1.0),
    ("ve", "lognormal", 1.0, 2.0),
    ("ve", "logsnr_uniform", 0.0, 1.0),
]


@pytest.mark.parametrize("name,noise,p_mean,p_std", PROPOSALS)
def test_importance_weights_keep_the_uniform_t_objective(name, noise, p_mean, p_std):
    """DSM under another proposal for t, weighted by 1 / ((T - eps) q(t)), estimates the same
    objective as uniform t (Monte Carlo, 4 standard errors); unweighted it does not."""
    from data import gmm8
    from models import MixtureScore
    from sde_lib import VESDE, VPSDE, subVPSDE
    from training.losses import DSMLoss

    sde = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE(0.01, 50.0)}[name]
    law = gmm8()
    wrong = MixtureScore(VPSDE(beta_min=1.0, beta_max=10.0), law)  # a score with a t-shaped error
    x0 = law.sample(50_000, generator=torch.Generator().manual_seed(1)).double()

    def mean_se(**kw):
        v = DSMLoss(sde, 1e-5, **kw)(wrong, x0, torch.Generator().manual_seed(2))
        return float(v.mean()), float(v.std()) / len(v) ** 0.5

    m_u, se_u = mean_se()
    kw = dict(noise=noise, p_mean=p_mean, p_std=p_std)
    m_q, se_q = mean_se(**kw)
    assert abs(m_q - m_u) < 4 * (se_u**2 + se_q**2) ** 0.5, (m_u, se_u, m_q, se_q)
    m_n, se_n = mean_se(**kw, importance_weights=False)
    assert abs(m_n - m_u) > 4 * (se_u**2 + se_n**2) ** 0.5  # the weights are what matters


@pytest.mark.parametrize("name,noise,p_mean,p_std", PROPOSALS[1:])
def test_proposal_fit_is_the_weights_effective_share(name, noise, p_mean, p_std):
    """TimeSampler.fit (quadrature) = 1 / E_q[w^2], the share of a batch the importance weights
    leave effective, estimated from 200,000 draws within 3 % (the heavy-tailed EDM-on-VP case is
    left out: a sample mean misses its rare huge weights, which is what the figure warns of)."""
    from sde_lib import VESDE, VPSDE, subVPSDE
    from training.losses import TimeSampler

    sde = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE(0.01, 50.0)}[name]
    sampler = TimeSampler(sde, 1e-5, noise, p_mean, p_std)
    _, w = sampler(
        200_000, torch.zeros(1, 1, dtype=torch.float64), torch.Generator().manual_seed(5)
    )
    assert sampler.fit() == pytest.approx(float(1 / w.square().mean()), rel=0.03)
    assert sampler.fit(importance_weights=False) == 1.0
    assert (
        TimeSampler(sde, 1e-5, "lognormal").fit() < 0.01
    )  # EDM's N(-1.2, 1.2^2): validate refuses


def test_edm_weighting_is_edms_loss_on_the_denoiser():
    """1/2 lambda(s) |D - x_0|^2 with EDM's lambda(s) = (s^2 + sd^2) / (s sd)^2 and the denoiser
    D = x~ + s^2 grad_x~ log p (EDM's coordinates x~ = x_t / alpha, s = sigma / alpha) equals DSM
    with weighting="edm", on the same draws."""
    from data import gmm8
    from models import MixtureScore
    from sde_lib import VPSDE, as_noise
    from training.losses import DSMLoss, TimeSampler

    sde, law, sd = VPSDE(), gmm8(), 0.5
    score = MixtureScore(VPSDE(beta_min=1.0, beta_max=10.0), law)
    x0 = law.sample(512, generator=torch.Generator().manual_seed(3)).double()
    got = DSMLoss(sde, 1e-5, noise="lognormal", weighting="edm", importance_weights=False)(
        score, x0, torch.Generator().manual_seed(4)
    )
    g = torch.Generator().manual_seed(4)
    t, _ = TimeSampler(sde, 1e-5, "lognormal")(512, x0, g)
    z = as_noise(g).randn(x0.shape, dtype=x0.dtype)
    alpha, sigma = (v[:, None] for v in sde.alpha_sigma(t))
    x = alpha * x0 + sigma * z
    s = sigma / alpha
    denoised = x / alpha + s.square() * alpha * score(x, t)
    lam = (s.square() + sd**2) / (s * sd).square()
    want = 0.5 * lam[:, 0] * (denoised - x0).square().sum(1)
    assert torch.allclose(got, want, rtol=1e-10)


def test_edm_recipe_trains_from_the_config_and_bad_choices_are_one_line(tmp_path):
    """EDM's recipe (preconditioning, log-normal noise levels, its weighting) from run.py's
    config, a few steps on gmm8; unknown or unfitting choices are one UserError line."""
    from sde_lib.errors import UserError
    from tasks.validate import validate
    from tests.runs import compose_cfg, run_mode

    recipe = ("model.parameterisation=edm", "training.noise=lognormal", "training.weighting=edm",
              "training.importance_weights=false", "training.steps=2")  # fmt: skip
    summary, _ = run_mode(tmp_path, "edm", *recipe)
    assert summary["status"] == "finished" and math.isfinite(summary["final_loss"])
    for bad, words in (
        (["model.parameterisation=foo"], "model.parameterisation='foo'"),
        (["training.noise=gamma"], "training.noise='gamma'"),
        (["sde=vdm", "training.noise=lognormal"], "sde=vdm learns its own"),
        (["training.loss=ssm", "training.weighting=edm"], "use training.loss=dsm"),
        (["training.noise=lognormal"], "leave 0.02% of a batch effective"),
        (["training.noise=lognormal", "training.p_mean=30"], "puts no mass on this SDE"),
    ):
        with pytest.raises(UserError) as e:
            validate(compose_cfg(tmp_path, *bad))
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
