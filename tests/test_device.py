"""Device-aware tests: every mode on the device of SCORESDE_TEST_DEVICE (cpu by default, so CI
runs them on the CPU; `SCORESDE_TEST_DEVICE=cuda python -m pytest -q` on a GPU machine)."""

from __future__ import annotations

import json

import pytest
import torch
from runs import run_mode

import samplers
from likelihood import elbo, log_likelihood_stats
from models import MixtureScore
from sde_lib import KeyedNoise
from tasks.common import build_dataset, build_score_model, build_sde
from training.loop import TrainSettings, train
from training.losses import make_loss

VP = {"name": "vp", "beta_min": 0.1, "beta_max": 20.0}


@pytest.fixture(scope="module")
def gmm8():
    return build_dataset({"name": "gmm8"})


def test_keyed_noise_is_the_same_on_every_device(device):
    idx = torch.arange(3000)
    cpu = KeyedNoise.for_indices(7, idx).randn((3000, 5), dtype=torch.float64)
    dev = KeyedNoise.for_indices(7, idx.to(device)).randn((3000, 5), torch.float64, device)
    assert dev.device.type == device.type
    torch.testing.assert_close(dev.cpu(), cpu, rtol=0, atol=1e-12)
    # and it is standard normal: mean, variance and no correlation between draws and rows
    assert abs(float(cpu.mean())) < 0.02 and abs(float(cpu.var()) - 1) < 0.03
    assert abs(float(torch.corrcoef(cpu.T)[0, 1:].abs().max())) < 0.05


@pytest.mark.parametrize("name,steps", [("em", 300), ("pc", 200), ("fast", None), ("ddim", 50)])
def test_samplers_run_on_the_device_and_reproduce_the_law(device, gmm8, name, steps):
    sde = build_sde(VP)
    score = MixtureScore(sde, gmm8.mixture).to(device)
    n = 3000
    noise = KeyedNoise.for_indices(0, torch.arange(n, device=device))
    x, nfe = samplers.sample(sde, score, (n, 2), name, steps, generator=noise, device=device)
    assert x.device.type == device.type and torch.isfinite(x).all()
    fresh = gmm8.test_set(n, seed=1).double()
    logp = gmm8.mixture.log_prob(x.double().cpu())
    gap = float(logp.mean() - gmm8.mixture.log_prob(fresh).mean())
    assert abs(gap) < 0.12, (name, gap)  # fresh-vs-fresh noise at n = 3000 is about 0.03


def test_likelihoods_on_the_device_match_the_exact_density(device, gmm8):
    sde = build_sde(VP)
    score = MixtureScore(sde, gmm8.mixture).to(device)
    x = gmm8.test_set(64).to(device)
    exact = gmm8.mixture.log_prob(x.double().cpu())
    res = log_likelihood_stats(
        sde, score, x.double(), divergence="exact", rtol=1e-6, atol=1e-6, eps=1e-5
    )
    assert res.logp.device.type == device.type
    assert float((res.logp.cpu() - exact).abs().mean()) < 0.02
    g = torch.Generator(device).manual_seed(0)
    bound, se = elbo(sde, score, x.double(), n_samples=64, generator=g)
    assert bound.device.type == device.type
    # the ELBO bounds -log p from above, up to its Monte Carlo error
    assert float((bound.cpu() + exact).mean()) > -3 * float(se.square().mean().sqrt() / 8)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_the_device_keeps_fp32_weights_and_never_a_nan(tmp_path, device, precision):
    cfg = {
        "sde": VP,
        "data": {"name": "gmm8"},
        "model": {"name": "mlp", "hidden": 64, "depth": 2},
        "seed": 0,
    }
    sde, ds = build_sde(VP), build_dataset(cfg["data"])
    model = build_score_model(cfg, sde, ds)
    before = [p.detach().clone() for p in model.parameters()]
    from training.distributed import DistInfo

    s = TrainSettings(
        steps=40,
        batch_size=128,
        lr=2e-3,
        warmup=5,
        log_every=10,
        ckpt_every=1000,
        precision=precision,
    )
    info = DistInfo(device=device)
    result = train(
        model, make_loss("dsm", sde), ds, s, tmp_path, config=cfg, dist_info=info, progress=False
    )
    assert result.step == 40 and result.skipped_steps == 0
    moved = 0.0
    for p, b in zip(model.parameters(), before):
        assert p.dtype == torch.float32 and p.device.type == device.type
        assert torch.isfinite(p).all()
        moved = max(moved, float((p.detach().cpu() - b).abs().max()))
    assert moved > 1e-3
    # the DSM loss falls from its start (about 1 per dimension) within 40 steps
    assert result.history["loss"][-1] < result.history["loss"][0]


def test_sample_and_nll_modes_use_the_requested_device(tmp_path, device):
    dev = f"device={device.type}"
    metrics, _ = run_mode(
        tmp_path, "s", "mode=sample", "model=exact", "sampler=fast", "sampler.n_samples=500", dev
    )
    assert metrics["device"] == device.type and metrics["non_finite_samples"] == 0
    nll, out = run_mode(tmp_path, "n", "mode=nll", "model=exact", "likelihood.n_points=20", dev)
    assert nll["device"] == device.type
    assert abs(nll["gap"]) < 0.05 and json.loads((out / "nll.json").read_text())["n"] == 20
