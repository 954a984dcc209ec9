"""VDM (learned schedule, VLB) and the discrete DDPM pieces (T-step bound, beta vs beta-tilde,
cosine schedule): closed forms, bounds against exact discrete likelihoods, training, modes."""

from __future__ import annotations

import math

import pytest
import torch

from data.mixtures import mixture5d
from likelihood.vlb import diffusion_samples, gamma_and_derivative, vlb
from models.exact import GaussianMixture, MixtureScore
from sde_lib import VDMSDE, VPSDE, GammaSchedule, subVPSDE
from sde_lib.vdm import endpoints_from_data
from tests.runs import compose_cfg, run_mode

torch.set_num_threads(1)

D, S, MU = 4, 0.5, 0.3  # Gaussian data N(MU, S^2 I) in D dimensions


def _gaussian_score(sde):
    """The exact score of the perturbed N(MU, S^2 I): its denoiser is linear."""

    def score(z, t):
        a, s = (c.reshape(-1, 1).to(z) for c in sde.alpha_sigma(t))
        return -(z - a * MU) / (a.square() * S**2 + s.square())

    return score


def _gaussian_bound(sde, t0, steps=None):
    """E_x of the bound in closed form: prior KL + Gaussian decoder + diffusion term, where the
    optimal denoiser's error is E||eps - eps_hat||^2 = D S^2 / (S^2 + e^gamma)."""
    ends = torch.tensor([t0, sde.T], dtype=torch.float64)
    (g0, g1), _ = gamma_and_derivative(sde, ends)
    g0, g1 = float(g0.detach()), float(g1.detach())
    a1, s1 = (float(c[1]) ** 2 for c in sde.alpha_sigma(ends))
    prior = 0.5 * D * (a1 * (MU**2 + S**2) + s1 - 1 - math.log(s1))
    recon = 0.5 * D * (math.log(2 * math.pi) + g0 + 1)
    if steps is None:
        diff = 0.5 * D * (math.log1p(S**2 * math.exp(-g0)) - math.log1p(S**2 * math.exp(-g1)))
    else:
        t = t0 + (sde.T - t0) * torch.arange(steps + 1, dtype=torch.float64) / steps
        g = gamma_and_derivative(sde, t)[0].detach()
        diff = float((0.5 * torch.expm1(g[1:] - g[:-1]) * D * S**2 / (S**2 + g[1:].exp())).sum())
    return prior + recon + diff


def _curved_vdm() -> VDMSDE:
    """A learned-kind schedule with a clearly non-linear shape and the default end points."""
    sde = VDMSDE(learn_endpoints=False)
    with torch.no_grad():
        sde.schedule.w3.add_(3.0)
        sde.schedule.w2.mul_(3.0)
    return sde


def test_gaussian_closed_form_invariance_and_discrete_bounds():
    t0 = 1e-5
    x = MU + S * torch.randn(
        1500, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    linear, curved = VDMSDE(schedule="linear", learn_endpoints=False), _curved_vdm()
    grid = torch.linspace(0, 1, 101)
    with torch.no_grad():
        bend = (curved.schedule.shape(grid)[0] - grid).abs().max()
    assert bend > 0.05  # the two schedules differ in shape, not in their end points
    closed = _gaussian_bound(linear, t0)
    assert _gaussian_bound(curved, t0) == pytest.approx(closed, abs=1e-9)
    entropy = 0.5 * D * math.log(2 * math.pi * math.e * S**2)
    assert entropy <= closed < entropy + 0.01  # the bound is tight for the exact model
    means = []
    for sde in (linear, curved):
        r = vlb(
            sde,
            _gaussian_score(sde),
            x,
            n_samples=16,
            eps=t0,
            generator=torch.Generator().manual_seed(1),
        )
        se = float(r.bound.std() / math.sqrt(len(x)))
        assert abs(float(r.bound.mean()) - closed) < 4 * se, (float(r.bound.mean()), closed, se)
        means.append((r.bound, r.stderr))
    # VDM's invariance: the same points, two schedules, the same bound within MC error
    (b1, e1), (b2, e2) = means
    mc = float((e1.square() + e2.square()).sum().sqrt() / len(x))
    assert abs(float(b1.mean() - b2.mean())) < 4 * mc
    # the discrete T-step bound: above the continuous one and decreasing towards it
    previous = math.inf
    for steps in (10, 100, 1000):
        exact = _gaussian_bound(linear, t0, steps)
        r = vlb(
            linear,
            _gaussian_score(linear),
            x[:200],
            n_samples=steps,
            steps=steps,
            eps=t0,
            generator=torch.Generator().manual_seed(2),
        )
        est, se = float(r.bound.mean()), float(r.bound.std() / math.sqrt(200))
        assert abs(est - exact) < 4 * se, (steps, est, exact, se)
        assert closed < exact < previous
        previous = exact
    assert previous - closed < 0.25  # T = 1000 is within 0.25 nats of the continuous bound


def _binned_log_pmf(mix: GaussianMixture, k: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """log P(cell k) under the continuous mixture, exactly (diagonal components): (N,)."""
    lo, hi = edges[k], edges[k + 1]  # (N, d)
    m, sd = mix.means[None], mix.variances[None].sqrt()  # (1, K, d)
    normal = torch.distributions.Normal(m, sd)
    mass = (normal.cdf(hi[:, None]) - normal.cdf(lo[:, None])).clamp_min(1e-300)
    return torch.logsumexp(mass.log().sum(-1) + mix.weights.log(), dim=1)


@pytest.mark.parametrize("gamma_min", [-13.3, -5.0])
def test_vlb_with_exact_score_never_below_true_discrete_nll(gamma_min):
    """mix5d's first two coordinates on 16 levels over [-3, 3]: the true discrete NLL by exact
    cell masses; the VLB of the exact mixture score is a bound on it (cross-entropy >= entropy)."""
    full = mixture5d()
    mix = GaussianMixture(full.weights, full.means[:, :2], full.variances[:, :2])
    levels, lo, hi = 16, -3.0, 3.0
    centres = torch.linspace(lo, hi, levels, dtype=torch.float64)
    edges = torch.cat(
        [torch.tensor([-math.inf]), (centres[1:] + centres[:-1]) / 2, torch.tensor([math.inf])]
    ).double()
    raw = mix.sample(600, torch.Generator().manual_seed(3)).double()
    k = torch.round((raw - lo) / (hi - lo) * (levels - 1)).long().clamp(0, levels - 1)
    x = centres[k]
    true_nll = -_binned_log_pmf(mix, k, edges)
    sde = VDMSDE(gamma_min=gamma_min, schedule="linear", learn_endpoints=False)
    r = vlb(
        sde,
        MixtureScore(sde, mix),
        x,
        levels=levels,
        data_range=(lo, hi),
        n_samples=32,
        generator=torch.Generator().manual_seed(4),
    )
    gap = r.bound - true_nll
    se = float(gap.std() / math.sqrt(len(gap)))
    assert float(gap.mean()) > -3 * se, (float(gap.mean()), se)
    if gamma_min == -5.0:  # decoder noise about the cell width: the bound is nearly tight
        assert float(gap.mean()) < 1.0  # measured 0.45 nats (2 dims); -13.3: ~7.4 nats


def test_gamma_schedule_is_monotone_and_derivative_exact():
    sch = GammaSchedule()
    with torch.no_grad():
        sch.w2.normal_(0, 3)
        sch.b2.normal_(0, 3)
        sch.w3.normal_(0, 3)
    t = torch.linspace(0, 1, 5001, dtype=torch.float64)
    with torch.no_grad():
        g, _ = sch(t)
    assert bool((g.diff() > 0).all()) and float(g[0]) == pytest.approx(-13.3, abs=1e-5)
    assert float(g[-1]) == pytest.approx(5.0, abs=1e-5)
    tt = torch.rand(9, dtype=torch.float64, requires_grad=True)
    g, dg = sch(tt)
    (auto,) = torch.autograd.grad(g.sum(), tt)
    torch.testing.assert_close(auto, dg.detach())


def test_vdm_sde_is_derived_from_its_marginal():
    sde = VDMSDE()
    t = torch.rand(7, dtype=torch.float64, requires_grad=True)
    alpha, sigma = sde.alpha_sigma(t)
    torch.testing.assert_close(alpha.square() + sigma.square(), torch.ones_like(alpha))
    (dlog_a,) = torch.autograd.grad(alpha.log().sum(), t)
    f, g = sde.sde(torch.ones(7, 1, dtype=torch.float64), t)
    torch.testing.assert_close(f[:, 0].detach(), dlog_a)  # f = d log alpha / dt x
    s2 = sigma.detach().square()
    gamma, dgamma = sde.gamma_and_derivative(t.detach())
    torch.testing.assert_close(g.detach().square(), dgamma.detach() * s2)


@pytest.mark.parametrize("cls", [VPSDE, subVPSDE])
def test_cosine_schedule_safe_and_consistent(cls):
    sde = cls(schedule="cosine")
    t = torch.linspace(0, 1, 1001, dtype=torch.float64, requires_grad=True)
    la = sde.log_alpha(t)
    (d,) = torch.autograd.grad(la.sum(), t)
    torch.testing.assert_close(-2 * d, sde.beta(t.detach()))
    alpha, sigma = sde.alpha_sigma(t.detach())
    assert torch.isfinite(alpha).all() and torch.isfinite(sde.beta(t.detach())).all()
    assert 0 < float(alpha[-1]) < 0.1 and float(alpha[0]) == pytest.approx(1.0)
    # Nichol & Dhariwal's alpha-bar before the cap
    tc = torch.tensor([0.3, 0.6], dtype=torch.float64)
    f = torch.cos((tc + 0.008) / 1.008 * math.pi / 2).square()
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(sde.alpha_sigma(tc)[0].square(), f / f0)


def test_ddpm_linear_betas_are_the_discrete_default_vp():
    sde = VPSDE()
    n = 1000
    t = torch.arange(n, dtype=torch.float64) / n
    _, G = sde.discretize(torch.zeros(n, 1, dtype=torch.float64), t, 1.0 / n)
    betas = G.square()
    ddpm = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    # the exact transition 1 - exp(-int beta over the step) vs DDPM's linspace: they differ by
    # the second-order term beta^2 / 2 (2e-4 at the end) and the half-step offset (1e-5)
    assert float((betas - ddpm).abs().max()) < 2.5e-4
    assert float(betas.sum() / ddpm.sum()) == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow  # 10-20 s: too long for the default run (CI runs -m slow too)
def test_vdm_train_nll_sample_and_learned_schedule(tmp_path):
    """sde=vdm data=digits: train (loss=auto is the VLB), then nll by the VLB and ancestral
    samples with no paths; gamma monotone, end points moved, lower estimator variance."""
    from tasks.common import load_score_model
    from training import checkpoint as ckpt

    net = ["sde=vdm", "data=digits", "model=unet", "model.ch=8"]
    # batch 32 (not the image default 128): 13 s of CPU instead of 23; the end points start from
    # the data (sde.gamma_min/max=auto) and move; the learned shape lowers the variance
    train, out = run_mode(
        tmp_path, "t", "mode=train", *net, "training.steps=200", "training.batch_size=32"
    )
    assert train["status"] == "finished" and math.isfinite(train["final_loss"])
    state = ckpt.load(train["checkpoint"])
    assert state["config"] and "schedule.ends" in state["ema"]
    nll, _ = run_mode(
        tmp_path,
        "n",
        "mode=nll",
        *net,
        "likelihood.method=vlb",
        "likelihood.n_points=40",
        "likelihood.vlb_samples=16",
        "likelihood.rtol=1e-3",
        "likelihood.atol=1e-3",
    )
    assert nll["method"] == "vlb" and "continuous-time VLB" in nll["bound"]
    assert math.isfinite(nll["bpd"]) and nll["vlb_stderr"] > 0
    assert math.isfinite(nll["ode_bpd"]) and nll["ode_nfe_mean"] > 0  # the ODE value beside it
    nll_d, _ = run_mode(
        tmp_path,
        "n2",
        "mode=nll",
        *net,
        "likelihood.method=vlb",
        "likelihood.steps=100",
        "likelihood.n_points=40",
        "likelihood.vlb_samples=16",
        "likelihood.with_ode=false",
    )
    assert "100-step" in nll_d["bound"] and nll_d["bpd"] > nll["bpd"] - 0.2
    smp, _ = run_mode(
        tmp_path,
        "s",
        "mode=sample",
        *net,
        "sampler=ancestral",
        "sampler.steps=100",
        "sampler.n_samples=16",
        "sampler.batch_size=16",
        "eval.n_samples=16",
    )
    assert smp["non_finite_samples"] == 0

    cfg = compose_cfg(tmp_path, "mode=nll", *net)
    sde, dataset, model, _ = load_score_model(cfg)
    learned = sde.schedule
    grid = torch.linspace(0, 1, 10001)
    with torch.no_grad():
        g = sde.gamma(grid)
    assert bool((g.diff() > 0).all())
    ends = learned.ends.detach()
    start = endpoints_from_data(17, (-1.0, 1.0), float(dataset.train.double().square().mean()))
    assert abs(float(ends[0]) - start[0]) > 0.03 and abs(float(ends[1]) - start[1]) > 0.01
    # the estimator's variance, learned shape vs the initial shape (same end points), common
    # random numbers: the shape was trained to lower it
    initial = GammaSchedule()
    with torch.no_grad():
        initial.ends.copy_(ends)
    x = dataset.test_set(None).repeat(2, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    u, z = torch.rand(x.shape[0], generator=gen), torch.randn(x.shape, generator=gen)
    var = {}
    for name, schedule in (("learned", learned), ("initial", initial)):
        sde.schedule = schedule
        with torch.no_grad():
            var[name] = float(diffusion_samples(sde, model, x, u, z, t0=1e-5).var())
    sde.schedule = learned
    assert var["learned"] < var["initial"], var


# slow: the "beta" variance and the cosine schedule (~7 s of CPU each); the default run keeps the
# default posterior variance on the default schedule
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["sampler.variance=beta"], marks=pytest.mark.slow),
        ["sampler.variance=posterior"],
        pytest.param(["sde.schedule=cosine"], marks=pytest.mark.slow),
    ],
)
def test_ancestral_reproduces_mix5d(tmp_path, extra):
    res, _ = run_mode(
        tmp_path,
        "s",
        "mode=sample",
        "model=exact",
        "data=mix5d",
        "sampler=ancestral",
        "sampler.n_samples=5000",
        "sampler.batch_size=5000",
        *extra,
    )
    true = -2.5790  # E log p of mix5d, 10^6 draws (sd of the mean 0.0016)
    assert abs(res["exact_loglik_mean"] - true) < 0.05, res["exact_loglik_mean"]


def test_vdm_config_errors(tmp_path):
    from tasks.common import UserError
    from tasks.validate import validate

    for bad in (
        ["sde.gamma_min=6"],
        ["sde.schedule=cubic"],
        ["sampler=ancestral", "sampler.variance=tilde"],
    ):
        cfg = compose_cfg(tmp_path, "sde=vdm" if "sde" not in bad[0] else "sde=vdm", *bad)
        with pytest.raises(UserError):
            validate(cfg)
    cfg = compose_cfg(tmp_path, "sde=vp", "sde.schedule=cubic")
    with pytest.raises(UserError):
        validate(cfg)


def test_endpoints_from_data():
    """gamma_0 puts the decoder's noise at 1/6 of the level spacing (8-bit data on [-1, 1]:
    VDM's own -13.3), gamma_1 leaves a prior KL of 1e-4 nats per dimension (exact formula)."""
    g0, g1 = endpoints_from_data(256, (-1.0, 1.0), 0.3)
    assert g0 == pytest.approx(-13.27, abs=0.01)
    g0, g1 = endpoints_from_data(17, (-1.0, 1.0), 0.7)
    assert math.exp(g0 / 2) == pytest.approx(2 / 16 / 6)
    a2 = 1 / (1 + math.exp(g1))
    kl = 0.5 * (a2 * 0.7 - a2 - math.log(1 - a2))
    assert kl == pytest.approx(1e-4, rel=0.01)
    assert endpoints_from_data(None, (-1.0, 1.0), 1.0)[0] == -13.3


@pytest.mark.slow  # about 2-4 min: 300 training steps of the default digits U-Net, then its bound
def test_vdm_digits_bound_beats_the_uniform_law_after_300_steps(tmp_path):
    """python run.py sde=vdm data=digits training.steps=300 (the default network and batch):
    the VLB on the test digits is below log2 17 = 4.09 bits/dim, what a uniform law on the 17
    levels gets (with CIFAR-10's end points it was 5.63)."""
    run_mode(tmp_path, "t", "mode=train", "sde=vdm", "data=digits", "training.steps=300")
    nll, _ = run_mode(tmp_path, "n", "mode=nll", "sde=vdm", "data=digits", "likelihood.method=vlb",
                      "likelihood.vlb_samples=32", "likelihood.with_ode=false")  # fmt: skip
    assert nll["bpd"] + 3 * nll["bpd_stderr"] < math.log2(17), nll["bpd"]
