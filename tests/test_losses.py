"""Losses against closed form: the exact score minimises every objective."""

from __future__ import annotations

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
