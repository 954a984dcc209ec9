"""Flow-matching paths as SDEs (sde=rectified, sde=trig) against closed form: the SDE's
coefficients reproduce the path's marginals, samplers with the exact mixture score draw the law
(the bounds of tests/test_samplers.py), the ODE log-likelihood matches log p, and a model trained
with parameterisation=flow samples deterministically and stochastically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from closed_form import exact_score, gmm8
from test_samplers import MMD_BOUND, Z_BOUND, quality

import samplers
from likelihood import log_likelihood
from sde_lib import RectifiedFlowSDE, TrigFlowSDE

PATHS = {"rectified": RectifiedFlowSDE, "trig": TrigFlowSDE}
RUNS = {
    "ode": {},
    "fast": dict(steps=29),
    "edm": dict(steps=100, S_churn=50.0, S_tmin=0.05, S_tmax=50.0),
    "em": dict(steps=500),
    "pc": dict(steps=500, corrector="langevin"),
}
SLOW = ("em", "pc")  # 500 steps of the reverse SDE: 5-12 s each


@pytest.mark.parametrize("path", PATHS)
def test_drift_and_diffusion_reproduce_the_paths_marginals(path):
    """Linear SDE: d alpha / dt = f alpha and d sigma^2 / dt = 2 f sigma^2 + g^2 (by autograd)."""
    sde = PATHS[path]()
    t = torch.linspace(0.01, sde.T, 50, dtype=torch.float64)
    alpha, sigma = sde.alpha_sigma(t)
    assert torch.allclose(alpha, sde.coefficients(t)[0]) and torch.allclose(
        sigma, t if path == "rectified" else torch.sin(torch.pi * t / 2)
    )
    da, ds2 = torch.func.jacfwd(lambda u: torch.stack(sde.coefficients(u)))(t).diagonal(0, 1, 2)
    ds2 = 2 * sigma * ds2
    drift, g = sde.sde(torch.ones(50, 1, dtype=torch.float64), t)
    f = drift[:, 0]
    assert torch.allclose(da, f * alpha, rtol=1e-10)
    assert torch.allclose(ds2, 2 * f * sigma.square() + g.square(), rtol=1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "sampler", [s if s not in SLOW else pytest.param(s, marks=pytest.mark.slow) for s in RUNS]
)
def test_samplers_draw_the_mixture_law_on_flow_paths(path, sampler):
    sde, law = PATHS[path](), gmm8()
    g = torch.Generator().manual_seed(2)
    x, _ = samplers.sample(
        sde, exact_score(sde, law), (3000, 2), sampler, generator=g, **RUNS[sampler]
    )
    z, ratio = quality("gmm8", x)
    assert z <= Z_BOUND and ratio <= MMD_BOUND, (z, ratio)


@pytest.mark.parametrize("path", PATHS)
def test_ode_log_likelihood_matches_log_p(path):
    sde, law = PATHS[path](), gmm8()
    x = law.sample(300, generator=torch.Generator().manual_seed(3)).double()
    logp, _ = log_likelihood(sde, exact_score(sde, law), x, rtol=1e-6, atol=1e-6)
    assert float((logp - law.log_prob(x)).abs().mean()) < 2e-3


def test_a_flow_model_trains_and_samples_both_ways(tmp_path):
    """sde=rectified model.parameterisation=flow from run.py's config; then the ODE and the
    reverse SDE (which flow-matching libraries do not offer) sample it."""
    from runs import run_mode

    common = ("sde=rectified", "model.parameterisation=flow")
    summary, _ = run_mode(tmp_path, "train", *common, "training.steps=20")
    assert summary["status"] == "finished"
    draws = ("sampler.n_samples=64", "sampler.batch_size=64")
    for sampler in ("sampler=ode", "sampler=em"):
        steps = "sampler.steps=20" if sampler == "sampler=em" else "sampler.rtol=1e-3"
        _, out = run_mode(tmp_path, sampler, "mode=sample", *common, sampler, steps, *draws)
        assert np.isfinite(np.load(out / "samples.npz")["samples"]).all()


@pytest.mark.parametrize(
    "source,target", [("vp", "rectified"), ("rectified", "vp"), ("ve", "trig"), ("subvp", "ve")]
)
def test_a_score_moved_to_another_path_is_that_paths_exact_score(source, target):
    """DDPM <-> EDM <-> rectified flow: with the source's exact mixture score, the moved score
    equals the target's exact score wherever the target's SNR is on the source path (float64;
    flow_matching's own test of its ScheduleTransformedModel tolerates 1e-2)."""
    from closed_form import make_sde

    from samplers.path import ChangedPath

    def sde_of(name):
        return PATHS[name]() if name in PATHS else make_sde(name)

    src, tgt, law = sde_of(source), sde_of(target), gmm8()
    moved = ChangedPath(exact_score(src, law), src, tgt)
    t = torch.linspace(0.02, tgt.T, 40, dtype=torch.float64)
    t = t[moved.in_range(t)]
    assert len(t) >= 20
    x = torch.randn(len(t), 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    got, want = moved(x, t), exact_score(tgt, law)(x, t)
    assert float(((got - want).abs().amax(1) / want.abs().amax(1)).max()) < 1e-11


def test_sampler_path_samples_a_vp_model_on_the_rectified_path(tmp_path):
    """run.py sde=vp model=exact sampler.path=rectified: the VP model's scores moved to rectified
    flow's path draw the law (the bounds of the samplers' tests); bad uses are one line."""
    from runs import compose_cfg, run_mode

    from sde_lib.errors import UserError
    from tasks.validate import validate

    draws = ("sampler=ode", "sampler.n_samples=3000", "sampler.batch_size=3000")
    common = ("mode=sample", "sde=vp", "model=exact")
    _, out = run_mode(tmp_path, "moved", *common, "sampler.path=rectified", *draws)
    x = torch.from_numpy(np.load(out / "samples.npz")["samples"])
    z, ratio = quality("gmm8", x)
    assert z <= Z_BOUND and ratio <= MMD_BOUND, (z, ratio)
    for bad, words in ((["sampler.path=foo"], "sampler.path='foo'"),
                       (["sde=vdm", "sampler.path=vp"], "sde=vdm learns")):  # fmt: skip
        with pytest.raises(UserError, match=words):
            validate(compose_cfg(tmp_path, "mode=sample", *bad))


@pytest.mark.parametrize("path", PATHS)
def test_vlb_on_flow_paths_bounds_the_exact_nll(path):
    """VDM's bound with the exact mixture score on a flow path: on mix5d's first two coordinates
    binned to 16 levels it lies above the exact discrete NLL (exact cell masses) and, with t0 at
    gamma = -5 (decoder noise about a cell), within 1 nat of it (measured 0.47 ± 0.05); on
    continuous gmm8, whose reverse model with the exact score is the data's own law, it matches
    -log p within its Monte Carlo error (measured -0.29 ± 0.21 nats)."""
    import math

    from closed_form import GaussianMixture, mixture5d
    from test_vdm import _binned_log_pmf

    from likelihood.vlb import vlb

    sde = PATHS[path]()
    full = mixture5d()
    mix = GaussianMixture(full.weights, full.means[:, :2], full.variances[:, :2])
    levels, lo, hi = 16, -3.0, 3.0
    centres = torch.linspace(lo, hi, levels, dtype=torch.float64)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    edges = torch.cat([-inf, (centres[1:] + centres[:-1]) / 2, inf])
    raw = mix.sample(600, torch.Generator().manual_seed(3)).double()
    k = torch.round((raw - lo) / (hi - lo) * (levels - 1)).long().clamp(0, levels - 1)
    t0 = samplers.grids.t_from_log_snr(sde, torch.tensor([2.5], dtype=torch.float64), sde.T, 1e-6)
    r = vlb(sde, exact_score(sde, mix), centres[k], levels=levels, data_range=(lo, hi),
            n_samples=32, eps=float(t0), generator=torch.Generator().manual_seed(4))  # fmt: skip
    gap = r.bound - (-_binned_log_pmf(mix, k, edges))
    se = float(gap.std()) / math.sqrt(len(gap))
    assert -3 * se < float(gap.mean()) < 1.0, (float(gap.mean()), se)

    law = gmm8()
    x = law.sample(500, generator=torch.Generator().manual_seed(6)).double()
    r = vlb(sde, exact_score(sde, law), x, n_samples=32, generator=torch.Generator().manual_seed(7))
    gap = r.bound + law.log_prob(x)
    se = float(gap.std()) / math.sqrt(len(gap))
    assert abs(float(gap.mean())) < 4 * se, (float(gap.mean()), se)


@pytest.mark.parametrize("path", PATHS)
def test_bits_per_dim_through_the_ode_on_flow_paths(path):
    """17-level data in [0, 1]^2 under a two-component mixture with its exact score: bits/dim
    through the flow path's ODE equals bits/dim from the exact density on the same draws
    (measured 6e-4 and 7e-4 bits apart on average)."""
    import math

    from closed_form import GaussianMixture

    from likelihood import dequantized_bpd

    law = GaussianMixture([0.5, 0.5], [[0.3, 0.6], [0.7, 0.4]], 0.01)
    levels, sde = 17, PATHS[path]()
    k = (law.sample(32, torch.Generator().manual_seed(18)).double() * levels).floor()
    k = k.clamp(0, levels - 1).long()
    score = exact_score(sde, law)

    def ode_logp(x: torch.Tensor) -> torch.Tensor:
        return log_likelihood(sde, score, x, rtol=1e-6, atol=1e-6)[0]

    opts = {"levels": levels, "n_draws": 2}
    via_ode = dequantized_bpd(ode_logp, k, generator=torch.Generator().manual_seed(19), **opts)
    exact = dequantized_bpd(law.log_prob, k, generator=torch.Generator().manual_seed(19), **opts)
    assert float((via_ode - exact).abs().mean()) < 1e-2 / (2 * math.log(2))
