"""Training: a trained score matches the exact one; resume is exact; every variant runs."""

from __future__ import annotations

import math

import pytest
import torch
from closed_form import exact_score, gmm8, make_sde
from runs import run_mode

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


def _train_gmm8(tmp_path, loss_name: str, steps: int, **loss_opts):
    cfg = {
        "sde": {"name": "vp"},
        "data": {"name": "gmm8"},
        "model": {"name": "mlp", "parameterisation": "eps"},
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


# Measured (seed 0, 3000 steps): DSM 0.12 / 0.014 / 0.032 at t = 0.1 / 0.5 / 1.
DSM_BOUNDS = {0.1: 0.2, 0.5: 0.05, 1.0: 0.06}
# Measured (seed 0, 3000 steps, 1 Rademacher probe): SSM 0.42 / 0.033 / 0.060. At t = 0.1 SSM's
# error depends on the seed far more than DSM's: seeds 0-3 give 0.42 / 0.41 / 0.43 / 0.37 (and
# the loop before per-example keyed batches gave 0.31 / 0.34 / 0.46 for seeds 0-2), so the bound
# there is 0.5, still half of what an untrained network scores (> 1).
SSM_BOUNDS = {0.1: 0.5, 0.5: 0.08, 1.0: 0.08}


def test_trained_dsm_score_is_close_to_exact(tmp_path):
    model, sde, mixture = _train_gmm8(tmp_path, "dsm", 3000)
    errors = {t: relative_score_error(model, sde, mixture, t) for t in DSM_BOUNDS}
    assert all(errors[t] < DSM_BOUNDS[t] for t in DSM_BOUNDS), errors


def test_trained_ssm_score_is_close_to_exact(tmp_path):
    model, sde, mixture = _train_gmm8(tmp_path, "ssm", 3000)
    errors = {t: relative_score_error(model, sde, mixture, t) for t in SSM_BOUNDS}
    assert all(errors[t] < SSM_BOUNDS[t] for t in SSM_BOUNDS), errors


def test_untrained_score_fails_the_bound(tmp_path):
    """The bounds above are not vacuous: an untrained network is far outside them."""
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


def test_default_gmm8_vp_training_run_meets_its_budget():
    """The default run's step count stays within the 5-minute budget of the brief (~4 ms/step)."""
    from runs import compose_cfg

    cfg = compose_cfg("/tmp", "mode=train")
    assert cfg["data"]["name"] == "gmm8" and cfg["sde"]["name"] == "vp"
    assert cfg["training"]["steps"] is None and cfg["data"]["train_steps"] <= 10000


def test_gmm8_exact_reference_is_the_data_law():
    ds = build_dataset({"name": "gmm8"})
    x = ds.train_batch(8000, torch.Generator().manual_seed(0))
    mix = gmm8()
    assert torch.allclose(x.mean(0), mix.means.float().mean(0), atol=0.05)
    assert make_sde("vp") is not None and ds.mixture is not None
