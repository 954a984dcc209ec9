"""Training: a trained score matches the exact one and its samples the law; resume is exact; every
variant runs; the gmm8 training law is its exact reference."""

from __future__ import annotations

import math

import pytest
import torch
from closed_form import exact_score
from runs import run_mode

import samplers
from metrics.quality import mmd
from sde_lib import KeyedNoise
from tasks.common import build_dataset, build_score_model, build_sde, load_score_model
from training import TrainSettings, make_loss, train
from training import checkpoint as ckpt


def relative_score_error(model, sde, mixture, t_val: float, n: int = 4000) -> float:
    """sqrt(E|s_theta - s*|^2 / E|s*|^2) over x_t ~ p_t."""
    g = torch.Generator().manual_seed(1)
    t = torch.full((n,), t_val)
    a, s = sde.alpha_sigma(t)
    x = a[:, None] * mixture.sample(n, generator=g) + s[:, None] * torch.randn(n, 2, generator=g)
    exact = exact_score(sde, mixture)(x, t)
    with torch.no_grad():
        err = (model(x, t) - exact).square().sum(1).mean() / exact.square().sum(1).mean()
    return math.sqrt(err.item())


def _train_gmm8(tmp_path, loss_name: str, steps: int, net: dict | None = None, **loss_opts):
    """Train an MLP (the default 256 x 4, or `net` options) on gmm8 with VP; its EMA weights."""
    cfg = {
        "sde": {"name": "vp"},
        "data": {"name": "gmm8"},
        "model": {"name": "mlp", "parameterisation": "eps", **(net or {})},
        "seed": 0,
    }
    sde, ds = build_sde(cfg["sde"]), build_dataset(cfg["data"])
    model = build_score_model(cfg, sde, ds)
    settings = TrainSettings(steps=steps, batch_size=256, lr=2e-3, ckpt_every=10**9)
    train(
        model,
        make_loss(loss_name, sde, **loss_opts),
        ds,
        settings,
        tmp_path,
        config=cfg,
        progress=False,
    )
    state = ckpt.load(ckpt.list_checkpoints(tmp_path / "checkpoints")[-1])
    model.load_state_dict(state["ema"])
    return model.eval(), sde, ds.mixture


# Measured (seed 0, 3000 steps, one thread): DSM 0.17 / 0.013 / 0.024 at t = 0.1 / 0.5 / 1 (0.12
# / 0.014 / 0.032 before per-example keyed batches).
DSM_BOUNDS = {0.1: 0.2, 0.5: 0.05, 1.0: 0.06}
# Measured (seed 0, 3000 steps, 1 Rademacher probe): SSM 0.42 / 0.033 / 0.060. At t = 0.1 SSM's
# error depends on the seed far more than DSM's: seeds 0-3 give 0.42 / 0.41 / 0.43 / 0.37 (and
# the loop before per-example keyed batches gave 0.31 / 0.34 / 0.46 for seeds 0-2), so the bound
# there is 0.5, still half of what an untrained network scores (> 1).
SSM_BOUNDS = {0.1: 0.5, 0.5: 0.08, 1.0: 0.08}
# Samples of a model, 2000 with sampler=fast (20 NFE), against 2000 fresh draws of the law: MMD
# over the rms fresh-vs-fresh MMD (three further fresh sets; `sample_ratio`). Measured: 1.68 for
# the DSM model above, 11.3 untrained; a fresh set itself spans about 0.8-1.4.
SAMPLE_BOUND = 2.5


def sample_ratio(model, sde, mixture, n: int = 2000) -> float:
    """MMD(model samples, fresh data) / rms MMD(fresh, fresh): 1 for a perfect sampler."""
    noise = KeyedNoise.for_indices(0, torch.arange(n))
    x, _ = samplers.sample(sde, model, (n, 2), "fast", generator=noise)
    g = torch.Generator().manual_seed(1)
    ref = mixture.sample(n, g)
    floor = math.sqrt(sum(mmd(mixture.sample(n, g), ref) ** 2 for _ in range(3)) / 3)
    return mmd(x, ref) / floor


# The default run's training check: 1000 DSM steps of a 128 x 2 MLP (~7 s of CPU instead of ~60
# for 3000 steps of the default 256 x 4). Away from the data (t = 0.5, 1) it already meets the
# tight DSM bounds; near it (t = 0.1) it is on its way. Measured (seeds 0 / 1): 0.56 / 0.55,
# 0.015 / 0.015, 0.025 / 0.025 at t = 0.1 / 0.5 / 1 and sample ratio 4.1 / 4.1, where the same
# untrained network scores 1.26, 1.15, 1.11 and 11.3.
QUICK_NET = {"hidden": 128, "depth": 2}
QUICK_BOUNDS = {0.1: 0.7, 0.5: DSM_BOUNDS[0.5], 1.0: DSM_BOUNDS[1.0]}
QUICK_SAMPLE_BOUND = 6.0


def test_dsm_training_learns_the_score(tmp_path):
    model, sde, mixture = _train_gmm8(tmp_path, "dsm", 1000, QUICK_NET)
    errors = {t: relative_score_error(model, sde, mixture, t) for t in QUICK_BOUNDS}
    assert all(errors[t] < QUICK_BOUNDS[t] for t in QUICK_BOUNDS), errors
    ratio = sample_ratio(model, sde, mixture)
    assert ratio < QUICK_SAMPLE_BOUND, ratio


@pytest.mark.slow
def test_trained_dsm_score_is_close_to_exact_and_samples_the_law(tmp_path):
    """Slow (3000 steps of the default network, ~60 s of CPU): the tight bounds at every t and
    the sample bound. The default run has test_dsm_training_learns_the_score."""
    model, sde, mixture = _train_gmm8(tmp_path, "dsm", 3000)
    errors = {t: relative_score_error(model, sde, mixture, t) for t in DSM_BOUNDS}
    assert all(errors[t] < DSM_BOUNDS[t] for t in DSM_BOUNDS), errors
    ratio = sample_ratio(model, sde, mixture)
    assert ratio < SAMPLE_BOUND, ratio


@pytest.mark.slow
def test_trained_ssm_score_is_close_to_exact(tmp_path):
    """Slow (3000 SSM steps, ~90 s of CPU). In the default run, SSM's estimator is checked by
    test_losses.py::test_exact_score_minimises_the_loss (ssm, two probe kinds; the exact score
    beats every perturbation of it) and its training mechanics by the ssm rows of
    test_train_variants_write_a_loadable_checkpoint and test_resume_reaches_the_same_parameters;
    training to the score is checked with DSM (test_dsm_training_learns_the_score)."""
    model, sde, mixture = _train_gmm8(tmp_path, "ssm", 3000)
    errors = {t: relative_score_error(model, sde, mixture, t) for t in SSM_BOUNDS}
    assert all(errors[t] < SSM_BOUNDS[t] for t in SSM_BOUNDS), errors


def test_untrained_score_fails_the_bound(tmp_path):
    """The bounds above are not vacuous: an untrained network is far outside them (the quick
    128 x 2 one too)."""
    cfg = {
        "sde": {"name": "vp"},
        "data": {"name": "gmm8"},
        "model": {"name": "mlp", "parameterisation": "eps"},
        "seed": 0,
    }
    sde, ds = build_sde(cfg["sde"]), build_dataset(cfg["data"])
    model = build_score_model(cfg, sde, ds).eval()
    assert relative_score_error(model, sde, ds.mixture, 0.5) > 5 * DSM_BOUNDS[0.5]
    assert relative_score_error(model, sde, ds.mixture, 0.1) > 2 * SSM_BOUNDS[0.1]  # 1.03
    assert sample_ratio(model, sde, ds.mixture) > 3 * SAMPLE_BOUND  # 11.3
    quick = build_score_model({**cfg, "model": {**cfg["model"], **QUICK_NET}}, sde, ds).eval()
    errors = {t: relative_score_error(quick, sde, ds.mixture, t) for t in QUICK_BOUNDS}
    assert all(errors[t] > 1.5 * QUICK_BOUNDS[t] for t in QUICK_BOUNDS), errors  # 1.26, 1.15, 1.11
    assert sample_ratio(quick, sde, ds.mixture) > 1.5 * QUICK_SAMPLE_BOUND  # 11.3


def _params(outputs_root, run):
    state = ckpt.load(ckpt.list_checkpoints(outputs_root / "train" / run / "checkpoints")[-1])
    return state


@pytest.mark.parametrize("loss", ["dsm", "ssm"])
def test_resume_reaches_the_same_parameters(tmp_path, loss):
    common = [
        "training.steps=60",
        f"training.loss={loss}",
        "training.log_every=10",
        "training.warmup=20",
    ]
    run_mode(tmp_path / "a", "full", *common)
    run_mode(tmp_path / "b", "first", *common[1:], "training.steps=25")
    run_mode(tmp_path / "b", "second", *common, "resume=true")
    full, resumed = _params(tmp_path / "a", "full"), _params(tmp_path / "b", "second")
    assert resumed["step"] == full["step"] == 60
    for key in ("model", "ema"):
        for name, value in full[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)
    assert resumed["history"]["step"][:2] == full["history"]["step"][:2] == [10, 20]


@pytest.mark.parametrize(
    "overrides",
    [
        ["sde=vp"],
        ["sde=ve"],
        ["sde=subvp"],
        ["training.loss=ssm"],
        ["training.loss=ddpm"],
        ["training.loss=smld", "sde=ve"],
        ["training.likelihood_weighting=true"],
        ["data=moons", "model=mlp", "model.embedding=fourier"],
        ["data=digits", "model=unet", "model.ch=16", "training.batch_size=32"],
    ],
    ids=lambda o: "+".join(o),
)
def test_train_variants_write_a_loadable_checkpoint(tmp_path, overrides):
    summary, out = run_mode(
        tmp_path, "run", "training.steps=20", "training.log_every=5", *overrides
    )
    assert summary["status"] == "finished" and summary["step"] == 20
    assert math.isfinite(summary["final_loss"])
    state = ckpt.load(ckpt.list_checkpoints(out / "checkpoints")[-1])
    assert state["step"] == 20 and (out / "loss.png").stat().st_size > 1000
    # the sample / nll modes find it without a path
    from runs import compose_cfg

    cfg = compose_cfg(tmp_path, "mode=sample", *overrides)
    _, _, model, path = load_score_model(cfg)
    assert path is not None and path.parent == out / "checkpoints"


# the documented gmm8 law (README, data/mixtures.py): 8 equal-weight components with means at
# radius 2 and angles k pi / 4, isotropic std 0.2
RING_MEANS = 2.0 * torch.tensor(
    [[math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)] for k in range(8)], dtype=torch.float64
)
RING_STD = 0.2


def ring_z_scores(x: torch.Tensor) -> dict[str, float]:
    """Largest |z| of the component shares, the per-component means and the pooled per-component
    std of points x (n, 2) against the documented ring; each point goes to its nearest mean
    (neighbouring means are 1.53 apart, 7.6 std: misassigned points are ~1e-4 of them)."""
    x = x.double()
    k = torch.cdist(x, RING_MEANS).argmin(1)
    n = x.shape[0]
    counts = torch.bincount(k, minlength=8).double()
    share_z = (counts / n - 1 / 8) / math.sqrt((1 / 8) * (7 / 8) / n)
    means = torch.stack([x[k == j].mean(0) for j in range(8)])
    mean_z = (means - RING_MEANS) / (RING_STD / counts.sqrt()[:, None])
    resid = x - means[k]
    std = resid.square().sum().div(2 * (n - 8)).sqrt()
    std_z = (std - RING_STD) / (RING_STD / math.sqrt(2 * 2 * n))
    return {
        "share": float(share_z.abs().max()),
        "mean": float(mean_z.abs().max()),
        "std": float(std_z.abs()),
    }


def test_gmm8_training_law_is_its_exact_reference_and_the_documented_ring():
    """The gmm8 batches that training draws are the law that the exact score, the likelihood
    references and the sample metrics use (ds.mixture), and that law is the ring of the README.

    8000 training draws: component shares within 4 binomial standard errors of 1/8, component
    means within 5 se (0.2 / sqrt(1000) = 0.006) of the ring, the std within 5 se (0.0011) of
    0.2; and the MMD of 2000 of them to 2000 draws of ds.mixture within 1.5 x the rms
    fresh-vs-fresh MMD of ds.mixture. Measured: |z| 2.7 / 2.0 / 1.5, MMD ratio 1.10 (five other
    seeds: |z| <= 1.7 / 3.5 / 0.8). Detection limits: a mean off by ~0.035, a std off by
    ~0.006; a ring of radius 2.05 or std 0.21 fails (mean |z| 9.5, std |z| 10.5, computed
    below).
    """
    ds = build_dataset({"name": "gmm8"})
    x = ds.train_batch(8000, torch.Generator().manual_seed(0))
    z = ring_z_scores(x)
    assert z["share"] <= 4 and z["mean"] <= 5 and z["std"] <= 5, z
    g = torch.Generator().manual_seed(1)
    ref = ds.mixture.sample(2000, g)
    floor = math.sqrt(sum(mmd(ds.mixture.sample(2000, g), ref) ** 2 for _ in range(3)) / 3)
    assert mmd(x[:2000], ref) <= 1.5 * floor, (mmd(x[:2000], ref), floor)
    # the checks have power: slightly wrong rings are found
    from data.mixtures import gmm8

    wider = ring_z_scores(gmm8(radius=2.05).sample(8000, torch.Generator().manual_seed(0)))
    blurred = ring_z_scores(gmm8(std=0.21).sample(8000, torch.Generator().manual_seed(0)))
    assert wider["mean"] > 5 and blurred["std"] > 5, (wider, blurred)
