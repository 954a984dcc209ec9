"""The sampler API: registry, options and their errors, NFE counting, determinism, data rank, grids,
Tweedie denoising, imputation and the quality measures."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
from closed_form import exact_score, gmm8, make_sde, mixture5d

import samplers
from metrics.quality import (
    component_weights,
    mmd,
    sliced_wasserstein,
    weight_z_scores,
)
from models.exact import GaussianMixture

SHARED = ("steps", "eps", "generator", "progress")


def setup(sde_name="vp", law=None):
    sde = make_sde(sde_name)
    law = law if law is not None else gmm8()
    return sde, exact_score(sde, law), law


# ---------------------------------------------------------------- registry and errors


def test_registry_names_and_shared_signature():
    assert {"em", "reverse_diffusion", "ancestral", "pc", "ode", "ddim", "fast"} <= set(
        samplers.SAMPLERS
    )
    assert samplers.SAMPLERS["fast"] is samplers.sample_fast  # its own dispatch (issue 10)
    assert set(samplers.PREDICTORS) == {"euler_maruyama", "reverse_diffusion", "ancestral", "none"}
    assert set(samplers.CORRECTORS) == {"langevin", "annealed_langevin", "none"}
    for name, fn in samplers.SAMPLERS.items():
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["sde", "score_fn", "x"], name
        kw_only = {p.name for p in params.values() if p.kind is p.KEYWORD_ONLY}
        assert set(SHARED) <= kw_only, name


def test_default_steps_per_sampler():
    steps = {name: samplers.sampler_options(name)["steps"] for name in samplers.SAMPLERS}
    assert steps["em"] == steps["pc"] == 1000 and steps["ddim"] == 50
    assert steps["fast"] == 19 and steps["ode"] is None


def test_unknown_sampler_raises():
    sde, score, _ = setup()
    with pytest.raises(ValueError, match=r"unknown sampler 'nope'; allowed: em, "):
        samplers.sample(sde, score, (4, 2), "nope")
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.check_applicable("nope", sde)


def test_ddim_on_ve_raises_a_clear_error():
    sde, score, _ = setup("ve")
    msg = (
        "sampler 'ddim' needs a variance-preserving SDE (sde=vp or sde=subvp); got VESDE; "
        "use sampler=ode or sampler=fast"
    )
    with pytest.raises(ValueError) as err:
        samplers.check_applicable("ddim", sde)
    assert str(err.value) == msg
    with pytest.raises(ValueError, match="needs a variance-preserving SDE"):
        samplers.sample(sde, score, (4, 2), "ddim")
    for name in ("vp", "subvp"):
        samplers.check_applicable("ddim", make_sde(name))
    for name in samplers.SAMPLERS:
        if name != "ddim":
            samplers.check_applicable(name, sde)


@pytest.mark.parametrize(
    ("sampler", "options", "match"),
    [
        ("em", dict(snr=0.1), r"snr is not an option of sampler em; allowed: grid"),
        ("pc", dict(eta=0.1), r"eta is not an option of sampler pc; allowed: predictor, "),
        ("pc", dict(predictor="rk4"), r"predictor='rk4' is not allowed; allowed: euler_maruyama, "),
        ("pc", dict(corrector="hmc"), r"corrector='hmc' is not allowed; allowed: langevin, "),
        ("pc", dict(snr=-1.0), r"snr=-1.0 is not allowed; allowed: a finite number > 0"),
        (
            "pc",
            dict(n_corrector_steps=1.5),
            r"n_corrector_steps=1.5 is not allowed; allowed: an integer >= 0",
        ),
        ("ddim", dict(eta=-0.5), r"eta=-0.5 is not allowed; allowed: a finite number >= 0"),
        ("ode", dict(method="rk45"), r"method='rk45' is not allowed; allowed: dopri5, "),
        ("ode", dict(rtol=0.0), r"rtol=0.0 is not allowed; allowed: a finite number > 0"),
        ("ode", dict(steps=10), r"steps=10 has no effect with the adaptive method 'dopri5'"),
        ("ode", dict(method="rk4"), r"the fixed-step method 'rk4' needs steps"),
        ("fast", dict(grid="cosine"), r"unknown grid 'cosine'; allowed: uniform, logsnr, edm"),
        ("fast", dict(steps=0), r"steps must be an integer >= 1, got 0"),
        ("fast", dict(eps=0.0), r"eps must lie in \(0, T\) = \(0, 1.0\), got 0.0"),
        ("fast", dict(eps=1.5), r"eps must lie in \(0, T\)"),
        ("fast", dict(denoise="yes"), r"denoise must be True or False, got 'yes'"),
        ("fast", dict(x_T=torch.zeros(3, 2)), r"x_T has shape \(3, 2\), expected \(4, 2\)"),
    ],
)
def test_bad_options_raise_naming_the_option(sampler, options, match):
    sde, score, _ = setup()
    with pytest.raises(ValueError, match=match):
        samplers.sample(sde, score, (4, 2), sampler, **options)


# ---------------------------------------------------------------- NFE, determinism, rank


@pytest.mark.parametrize(
    ("sampler", "steps", "options", "nfe"),
    [
        ("em", 7, {}, 8),
        ("em", 7, dict(denoise=False), 7),
        ("reverse_diffusion", 5, {}, 6),
        ("ancestral", 5, {}, 6),
        ("pc", 5, dict(n_corrector_steps=2), 16),
        ("pc", 5, dict(predictor="none"), 6),
        ("pc", 5, dict(corrector="none", predictor="none", denoise=False), 0),
        ("pc", 5, dict(corrector="annealed_langevin"), 11),
        ("ode", 6, dict(method="euler"), 7),
        ("ode", 6, dict(method="rk4"), 25),
        ("ode", 6, dict(method="midpoint"), 13),
        ("ddim", 9, dict(eta=0.5), 10),
        ("fast", 9, {}, 10),
        ("dpm_solver", 3, dict(grid="edm"), 4),
        ("heun", 4, {}, 8),
    ],
)
def test_nfe_counts_score_evaluations(sampler, steps, options, nfe):
    sde, score, _ = setup()
    g = torch.Generator().manual_seed(0)
    x, count = samplers.sample(sde, score, (16, 2), sampler, steps, generator=g, **options)
    assert count == nfe and x.shape == (16, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize("sampler", ["em", "reverse_diffusion", "ancestral", "pc", "ddim"])
def test_samples_are_a_function_of_the_seed(sampler):
    sde, score, _ = setup()
    opts = dict(eta=1.0) if sampler == "ddim" else {}

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return samplers.sample(sde, score, (32, 2), sampler, 20, generator=g, **opts)[0]

    assert torch.equal(draw(1), draw(1))
    assert not torch.allclose(draw(1), draw(2))


def test_x_T_replaces_the_prior_draw():
    sde, score, _ = setup()
    x_T = sde.prior_sampling((32, 2), generator=torch.Generator().manual_seed(3))
    a, _ = samplers.sample(sde, score, (32, 2), "fast", x_T=x_T)
    b, _ = samplers.sample(sde, score, (32, 2), "fast", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("sampler", "sde_name"),
    [(n, s) for n in samplers.SAMPLERS for s in ("vp", "ve") if (n, s) != ("ddim", "ve")],
)
def test_every_sampler_runs_on_image_shaped_data(sampler, sde_name):
    """(B, C, H, W) data: a 2-component mixture on 1 x 2 x 2 images; shapes and finiteness."""
    law = GaussianMixture(
        [0.4, 0.6], [[1.0, 0.0, -1.0, 0.5], [-1.0, 0.5, 1.0, 0.0]], 0.05, (1, 2, 2)
    )
    sde, score, _ = setup(sde_name, law)
    steps = None if sampler == "ode" else 10
    x, nfe = samplers.sample(
        sde, score, (8, 1, 2, 2), sampler, steps, generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == (8, 1, 2, 2) and torch.isfinite(x).all() and nfe > 0


def test_progress_bar_counts_the_steps_and_only_when_asked(capsys):
    """The bar's final line (tqdm on stderr): 5/5 for em with 5 steps; for the adaptive ODE the
    count of drift evaluations, which is the NFE less the denoising evaluation."""
    sde, score, _ = setup()
    samplers.sample(sde, score, (4, 2), "em", 5, progress=True)
    err = capsys.readouterr().err
    assert re.findall(r"(\d+)/(\d+)", err)[-1] == ("5", "5"), err
    _, nfe = samplers.sample(sde, score, (4, 2), "ode", progress=True)
    err = capsys.readouterr().err
    counts = re.findall(r"ODE drift evaluations: (\d+)it", err)
    assert counts and int(counts[-1]) == nfe - 1 > 10, (err, nfe)
    samplers.sample(sde, score, (4, 2), "em", 5)
    samplers.sample(sde, score, (4, 2), "ode")
    assert capsys.readouterr().err == ""


def test_encode_with_a_fixed_step_method_inverts_decode_approximately():
    sde, score, law = setup("vp")
    x = law.sample(64, torch.Generator().manual_seed(0))
    z, nfe = samplers.encode(sde, score, x, method="rk4", steps=200)
    back, _ = samplers.decode(sde, score, z, method="rk4", steps=200)
    assert nfe == 800
    assert ((back - x).norm() / x.norm()).item() < 1e-3


# ---------------------------------------------------------------- grids


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_grids_run_from_T_to_eps_in_float64(sde_name):
    sde = make_sde(sde_name)
    for name in samplers.GRIDS:
        ts = samplers.get_grid(name, sde, 12, 1e-3)
        assert ts.dtype == torch.float64 and ts.shape == (13,)
        assert ts[0].item() == sde.T and ts[-1].item() == 1e-3
        assert (ts.diff() < 0).all(), name
    alpha, sigma = sde.alpha_sigma(samplers.logsnr_grid(sde, 12, 1e-3))
    lam = (alpha / sigma).log()
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(12), rtol=1e-8, atol=1e-8)
    alpha, sigma = sde.alpha_sigma(samplers.edm_grid(sde, 12, 1e-3, rho=7.0))
    r = (sigma / alpha) ** (1 / 7)
    torch.testing.assert_close(r.diff(), r.diff().mean().expand(12), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- Tweedie and imputation


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_tweedie_denoise_is_the_gaussian_posterior_mean(sde_name):
    """For x_0 ~ N(mu, c): E[x_0 | x_t] = mu + alpha c / (alpha^2 c + sigma^2) (x_t - alpha mu)."""
    mu, c = torch.tensor([0.7, -1.2], dtype=torch.float64), 0.3
    sde, score, _ = setup(sde_name, GaussianMixture([1.0], mu[None], c))
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = 0.3
    alpha, sigma = (v.item() for v in sde.alpha_sigma(torch.tensor([t], dtype=torch.float64)))
    expected = mu + alpha * c / (alpha**2 * c + sigma**2) * (x - alpha * mu)
    got = samplers.tweedie_denoise(sde, score, x, t)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _imputation_case(law_name: str, n: int):
    """gmm8 given x_0 = 1.5 or the 5-D mixture given x_2 = -0.3: (law, known, mask, conditional)."""
    law, coord, value = (gmm8(), 0, 1.5) if law_name == "gmm8" else (mixture5d(), 2, -0.3)
    known = torch.zeros(n, law.dim)
    known[:, coord] = value
    mask = torch.zeros(law.dim, dtype=torch.bool)
    mask[coord] = True
    return law, known, mask, law.conditional(known[0], mask)


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_inpaint_keeps_known_values_exactly(sde_name):
    law, known, mask, _ = _imputation_case("mixture5d", 64)
    known = known + 0.1 * torch.randn(known.shape, generator=torch.Generator().manual_seed(0))
    sde, score, _ = setup(sde_name, law)
    x, nfe = samplers.inpaint(sde, score, known, mask, steps=50, generator=torch.Generator())
    assert nfe == 101 and x.shape == known.shape and torch.isfinite(x).all()
    assert torch.equal(x[:, mask], known[:, mask])
    assert not torch.equal(x[:, ~mask], known[:, ~mask])


def test_inpaint_rejects_a_non_bool_mask():
    law, known, mask, _ = _imputation_case("gmm8", 4)
    sde, score, _ = setup("vp", law)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        samplers.inpaint(sde, score, known, mask.float(), steps=5)


@pytest.mark.xfail(
    strict=True,
    reason="the replacement method does not sample the exact conditional of a multimodal law: "
    "it ignores the coupling of the noised known coordinates to the unknown ones, and the "
    "component is chosen at noise levels where the fresh noised known value says little",
)
@pytest.mark.parametrize("law_name", ["gmm8", "mixture5d"])
def test_inpaint_draws_the_conditional_law(law_name):
    n = 2000
    law, known, mask, cond = _imputation_case(law_name, n)
    sde, score, _ = setup("vp", law)
    x, _ = samplers.inpaint(sde, score, known, mask, steps=500, generator=torch.Generator())
    g = torch.Generator().manual_seed(1)
    ref = cond.sample(n, g)
    base = math.sqrt(sum(mmd(cond.sample(n, g), ref) ** 2 for _ in range(3)) / 3)
    unknown = x[:, ~mask]
    assert weight_z_scores(cond, unknown).abs().max() <= 3
    assert mmd(unknown, ref) <= 1.5 * base


@pytest.mark.parametrize(
    "sde_name,law_name",
    [
        ("vp", "gmm8"),
        # slow (~11, ~8 and ~12 s of CPU): the 5-D law and the other SDEs; the default run keeps
        # gmm8 on VP
        pytest.param("vp", "mixture5d", marks=pytest.mark.slow),
        pytest.param("ve", "gmm8", marks=pytest.mark.slow),
        pytest.param("subvp", "mixture5d", marks=pytest.mark.slow),
    ],
)
def test_inpaint_resampled_draws_the_conditional_law(sde_name, law_name):
    """Replacement draws + importance resampling against the PF-ODE density: the right law.

    Measured (n = 1000, seed 0; vp-gmm8, vp-5d, ve-gmm8, subvp-5d): max weight |z| 0.52, 1.18,
    0.87, 1.06 and MMD ratio 0.76, 0.96, 0.33, 0.95 with 250-300 NFE, where the replacement
    method alone (500 steps) gives |z| 32, 22, 29, 22 and MMD ratio 3.1, 5.2, 2.9, 5.0.
    """
    n = 1000
    law, known, mask, cond = _imputation_case(law_name, n)
    sde, score, _ = setup(sde_name, law)
    g = torch.Generator().manual_seed(0)
    x, nfe = samplers.inpaint_resampled(sde, score, known, mask, generator=g)
    assert torch.equal(x[:, mask], known[:, mask]) and nfe > 100
    gr = torch.Generator().manual_seed(1)
    ref = cond.sample(n, gr)
    base = math.sqrt(sum(mmd(cond.sample(n, gr), ref) ** 2 for _ in range(3)) / 3)
    unknown = x[:, ~mask]
    assert weight_z_scores(cond, unknown).abs().max() <= 3
    assert mmd(unknown, ref) <= 1.5 * base


def test_inpaint_resampled_needs_one_mask_pattern():
    law, known, mask, _ = _imputation_case("gmm8", 4)
    sde, score, _ = setup("vp", law)
    with pytest.raises(ValueError, match="one pattern"):
        samplers.inpaint_resampled(sde, score, known, mask.expand(4, 2).clone())


# ---------------------------------------------------------------- quality measures


def test_quality_measures_separate_right_from_wrong():
    law = mixture5d()
    g = torch.Generator().manual_seed(0)
    a, b = law.sample(1500, g), law.sample(1000, g)
    assert sliced_wasserstein(a, a) == 0 and mmd(a, a) < 1e-6
    shifted = b + 0.5
    assert sliced_wasserstein(a, shifted) > 3 * sliced_wasserstein(a, b)
    assert mmd(a, shifted) > 3 * mmd(a, b)
    wider = law.means[0].float() + 1.3 * (b - law.means[0].float())
    assert mmd(a, wider) > 2 * mmd(a, b)


def test_component_weights_recover_the_mixture():
    law = mixture5d()
    x, labels = law.sample(4000, torch.Generator().manual_seed(0), return_labels=True)
    from metrics.quality import assign_components

    assert (assign_components(law, x) == labels).float().mean() > 0.999
    frac = component_weights(law, x)
    assert abs(frac.sum().item() - 1) < 1e-12
    assert weight_z_scores(law, x).abs().max() < 3
    # all mass in one component is far off
    assert weight_z_scores(law, x[labels == 0]).abs().max() > 10
