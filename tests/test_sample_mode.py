"""mode=sample end to end: every sampler writes samples.npz, a picture and metrics.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runs import run_mode

from tasks.common import UserError

FAST = {
    "pc": ["sampler.steps=50"],
    "em": ["sampler.steps=50"],
    "ode": ["sampler.rtol=1e-3", "sampler.atol=1e-3"],
    "ddim": ["sampler.steps=20"],
    "fast": ["sampler.grid=null"],  # the shipped table: grid=auto's fit (~1 min) is tested apart
    "dpm_solver": [],
    "heun": [],
    "reverse_diffusion": ["sampler.steps=50"],
    "ancestral": ["sampler.steps=50"],
}
# score evaluations per batch: steps (+ corrector steps) + the final denoising; None: adaptive
NFE = {
    "pc": 101,
    "em": 51,
    "ode": None,
    "ddim": 21,
    "fast": 20,
    "dpm_solver": 20,
    "heun": 36,
    "reverse_diffusion": 51,
    "ancestral": 51,
}


def _check_outputs(out, n):
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("sampler", "nfe", "seconds", "samples_per_second"):
        assert key in metrics
    with np.load(out / "samples.npz") as f:
        assert f["samples"].shape[0] == n and np.isfinite(f["samples"]).all()
    assert (out / "samples.png").stat().st_size > 1000
    return metrics


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    run_mode(root, "gmm8", "training.steps=300")
    return root


@pytest.mark.parametrize("sampler", list(FAST))
def test_each_sampler_on_a_checkpoint(trained_root, sampler):
    metrics, out = run_mode(
        trained_root,
        f"s_{sampler}",
        "mode=sample",
        f"sampler={sampler}",
        "sampler.n_samples=200",
        "sampler.batch_size=100",
        *FAST[sampler],
    )
    metrics = _check_outputs(out, 200)
    assert metrics["sampler"] == sampler
    assert metrics["nfe"] == NFE[sampler] if NFE[sampler] else 10 < metrics["nfe"] < 500, metrics
    # a mixture law: quality against fresh data and the exact density are reported
    assert metrics["mmd_to_fresh_data"] > 0 and np.isfinite(metrics["exact_loglik_mean"])


def test_exact_score_sampling_matches_the_law(tmp_path):
    metrics, out = run_mode(
        tmp_path, "exact", "mode=sample", "model=exact", "sampler=fast", "sampler.n_samples=2000"
    )
    _check_outputs(out, 2000)
    # with the exact score the samples are as close to fresh data as fresh data is (bound 1.5x)
    assert metrics["mmd_to_fresh_data"] < 1.5 * metrics["mmd_fresh_vs_fresh"]
    assert abs(metrics["exact_loglik_mean"] - metrics["exact_loglik_mean_fresh_data"]) < 0.1
    assert metrics["nfe"] == 20


def test_images_write_a_grid(tmp_path):
    run_mode(
        tmp_path,
        "digits",
        "data=digits",
        "model=unet",
        "model.ch=8",
        "training.steps=3",
        "training.batch_size=8",
    )
    metrics, out = run_mode(
        tmp_path,
        "digits_s",
        "mode=sample",
        "data=digits",
        "model=unet",
        "model.ch=8",
        "sampler=fast",
        "sampler.grid=null",
        "sampler.n_samples=16",
    )
    with np.load(out / "samples.npz") as f:
        assert f["samples"].shape == (16, 1, 8, 8)
    from PIL import Image

    assert Image.open(out / "samples.png").size[0] >= 64


def test_ddim_on_ve_is_refused(tmp_path):
    with pytest.raises(UserError, match="ddim"):
        run_mode(tmp_path, "x", "mode=sample", "sampler=ddim", "sde=ve", "model=exact")
