"""Score networks: shapes from 8x8 to 32x32, the parameterisation, the config-driven sizes."""

from __future__ import annotations

import pytest
import torch
from closed_form import make_sde

from data.datasets import Dataset
from models import MLP, ScoreModel, UNet
from tasks.common import build_network


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16), (1, 28, 28), (3, 32, 32)])
def test_unet_runs_on_image_sizes_from_config_defaults(shape):
    ds = Dataset("x", shape, "images")
    net = build_network({"name": "auto", "ch": 8}, ds)
    assert isinstance(net, UNet)
    x, t = torch.randn(2, *shape), torch.rand(2)
    out = net(x, t)
    assert out.shape == x.shape
    # zero-initialised output layer: the untrained network predicts zero noise
    assert out.abs().max() == 0
    out.sum().backward()


@pytest.mark.parametrize("embedding", ["sinusoidal", "fourier"])
def test_mlp_and_time_embeddings(embedding):
    net = MLP((5,), hidden=32, depth=2, embedding=embedding)
    x = torch.randn(4, 5)
    a, b = net(x, torch.full((4,), 0.1)), net(x, torch.full((4,), 0.9))
    assert a.shape == x.shape and not torch.allclose(a, b)  # the output depends on t


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_eps_parameterisation_divides_by_the_marginal_std(name):
    sde = make_sde(name)

    class Const(torch.nn.Module):
        def forward(self, x, t):
            return torch.ones_like(x)

    model = ScoreModel(Const(), sde, "eps", sigma_data=0.5)
    t = torch.tensor([0.1, 0.5, 1.0])
    x = torch.randn(3, 1, 2, 2)
    sigma = sde.alpha_sigma(t)[1]
    assert torch.allclose(model(x, t), -torch.ones_like(x) / sigma[:, None, None, None])
    raw = ScoreModel(Const(), sde, "score")
    assert torch.equal(raw(x, t), torch.ones_like(x))
    with pytest.raises(ValueError, match="parameterisation"):
        ScoreModel(Const(), sde, "foo")


def test_network_sees_unit_variance_inputs():
    """c_in = 1/sqrt(alpha^2 sigma_data^2 + sigma^2) makes the input variance ~1 at every t."""
    sde = make_sde("ve")
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x, t):
            seen["std"] = x.std().item()
            return x

    model = ScoreModel(Probe(), sde, sigma_data=1.0)
    x0 = torch.randn(20000, 2)
    for t_val in (0.01, 0.5, 1.0):
        t = torch.full((20000,), t_val)
        a, s = sde.alpha_sigma(t)
        model(a[:, None] * x0 + s[:, None] * torch.randn(20000, 2), t)
        assert seen["std"] == pytest.approx(1.0, rel=0.03)
