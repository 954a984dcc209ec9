"""mode=nll end to end through tasks.dispatch: exact score vs exact density, trained checkpoints,
bits/dim on digits, resumable batches, and config validation."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from runs import log_lines

import tasks.nll
from tasks import UserError, dispatch
from tasks.validate import validate_likelihood

CONF = Path(__file__).resolve().parents[1] / "conf"
REQUIRED = (
    "nll_nats",
    "bpd",
    "stderr",
    "hutchinson_stderr",
    "n",
    "nfe_mean",
    "seconds",
    "method",
    "solver",
    "rtol",
    "atol",
    "eps",
    "divergence",
    "backend",
    "checkpoint",
)
DIGITS = ("data=digits", "model=unet", "model.ch=8")


def make_cfg(root: Path, *overrides: str) -> dict:
    """The resolved config of `python run.py outputs_root=root ... overrides`, quiet."""
    quiet = [f"outputs_root={root}", "logger.mode=disabled", "progress=false", "device=cpu"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*quiet, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def run(root: Path, name: str, *overrides: str) -> tuple[dict, dict, list[str]]:
    """dispatch one run into root/name; (its return value, its nll.json or {}, its log lines)."""
    out = root / name
    with log_lines() as lines:
        result = dispatch(make_cfg(root, *overrides), out)
    written = out / "nll.json"
    return result, json.loads(written.read_text()) if written.is_file() else {}, lines


@pytest.fixture(scope="module")
def gmm8_run(tmp_path_factory) -> Path:
    """outputs_root holding one 200-step MLP training run on gmm8 (vp)."""
    root = tmp_path_factory.mktemp("gmm8")
    run(root, "train/tiny", "mode=train", "training.steps=200")
    return root


def test_exact_score_matches_exact_density(tmp_path):
    # the closed-form mixture score through the whole path: measured gap 2.4e-5 nats (n = 64)
    _, s, lines = run(tmp_path, "out", "mode=nll", "model=exact", "likelihood.n_points=64")
    assert s["n"] == 64 and s["checkpoint"] is None and s["bpd"] is None
    assert s["divergence"] == "exact" and s["threads"] == 1  # divergence, threads = auto
    assert abs(s["nll_nats"] - s["exact_nll_nats"]) < 1e-2
    assert s["gap"] == pytest.approx(s["nll_nats"] - s["exact_nll_nats"])
    assert lines[-1].startswith("nll ") and "exact" in lines[-1]


def test_trained_checkpoint_is_found_and_evaluated(gmm8_run):
    overrides = (
        "mode=nll",
        "likelihood.n_points=50",
        "likelihood.rtol=1e-3",
        "likelihood.atol=1e-3",
    )
    result, s, lines = run(gmm8_run, "nll/a", *overrides)
    ckpt = next((gmm8_run / "train/tiny/checkpoints").glob("ckpt_*.pt"))
    assert any(f"using checkpoint {ckpt}" in ln for ln in lines)
    assert result == s and set(REQUIRED) <= set(s)
    assert s["checkpoint"] == str(ckpt) and s["use_ema"] is True and s["n"] == 50
    for key in ("nll_nats", "stderr", "nfe_mean", "exact_nll_nats", "gap", "seconds"):
        assert math.isfinite(s[key]), key


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """outputs_root holding one 5-step U-Net (ch 8) training run on digits (vp)."""
    root = tmp_path_factory.mktemp("digits")
    run(root, "train/unet", "mode=train", *DIGITS, "training.steps=5")
    return root


@pytest.mark.parametrize(
    "method, overrides",
    [
        ("elbo", ("likelihood.elbo_samples=20", "likelihood.dequant_draws=2")),
        ("ode", ("likelihood.n_points=4", "likelihood.rtol=1e-3", "likelihood.atol=1e-3")),
    ],
)
def test_digits_bits_per_dim(digits_run, method, overrides):
    _, s, _ = run(
        digits_run,
        f"nll/{method}",
        "mode=nll",
        *DIGITS,
        f"likelihood.method={method}",
        "likelihood.n_points=8",
        "likelihood.batch_size=4",
        *overrides,
    )
    assert s["dim"] == 64 and s["levels"] == 17 and math.isfinite(s["bpd"]) and s["bpd"] > 0
    if method == "elbo":
        assert s["n"] == 8 and s["dequant_draws"] == 2 and math.isfinite(s["elbo_stderr"])
    else:  # divergence=auto takes Hutchinson's estimator for images
        assert s["n"] == 4 and s["divergence"] == "hutchinson" and s["elbo_stderr"] is None
    # likelihood/units.py: bpd = (nll / D - log(hi - lo) + log L) / ln 2 with (lo, hi) = (-1, 1)
    expected = (s["nll_nats"] / 64 - math.log(2.0) + math.log(17)) / math.log(2)
    assert s["bpd"] == pytest.approx(expected, rel=1e-9)
    assert s["bpd_stderr"] == pytest.approx(s["stderr"] / (64 * math.log(2)))


def test_interrupted_evaluation_resumes_from_cached_batches(tmp_path, monkeypatch):
    calls = {"n": 0, "stop_at": 2}
    original = tasks.nll.log_likelihood_stats

    def counted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(tasks.nll, "log_likelihood_stats", counted)
    # Hutchinson probes make the numbers depend on the per-batch seeds
    overrides = (
        "mode=nll",
        "model=exact",
        "likelihood.n_points=12",
        "likelihood.batch_size=4",
        "likelihood.divergence=hutchinson",
        "likelihood.n_probes=2",
    )
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "first", *overrides)
    assert not (tmp_path / "first/nll.json").exists()

    calls.update(n=0, stop_at=-1)
    _, resumed, lines = run(tmp_path, "second", *overrides)
    assert calls["n"] == 2 and resumed["batches_reused"] == 1
    assert any(ln.startswith("reusing 1 of 3 batches") for ln in lines)

    (tmp_path / "second/nll.json").unlink()
    calls.update(n=0)
    _, again, lines = run(tmp_path, "third", *overrides)
    assert calls["n"] == 0 and any(ln.startswith("reusing 3 of 3 batches") for ln in lines)

    _, fresh, _ = run(tmp_path / "elsewhere", "out", *overrides)  # no cache: all computed anew
    for key in ("nll_nats", "stderr", "hutchinson_stderr", "gap", "nfe_mean"):
        assert resumed[key] == again[key] == fresh[key], key
    assert math.isfinite(fresh["hutchinson_stderr"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("likelihood.rtol=-1", "likelihood.rtol"),
        ("likelihood.atol=0", "likelihood.atol"),
        ("likelihood.backend=foo", "likelihood.backend"),
        ("likelihood.method=exact", "likelihood.method"),
        ("likelihood.divergence=trace", "likelihood.divergence"),
        ("likelihood.probe=uniform", "likelihood.probe"),
        ("likelihood.n_probes=0", "likelihood.n_probes"),
        ("likelihood.solver=euler", "likelihood.solver"),
        ("likelihood.eps=1", "likelihood.eps"),
        ("likelihood.eps=0", "likelihood.eps"),
        ("likelihood.n_points=0", "likelihood.n_points"),
        ("likelihood.batch_size=2.5", "likelihood.batch_size"),
        ("likelihood.dequant_draws=0", "likelihood.dequant_draws"),
        ("likelihood.elbo_samples=1", "likelihood.elbo_samples"),
        ("likelihood.dtype=float16", "likelihood.dtype"),
        ("likelihood.threads=0", "likelihood.threads"),
        ("likelihood.threads=many", "likelihood.threads"),
    ],
)
def test_bad_likelihood_value_is_a_user_error_naming_the_key(tmp_path, override, key):
    cfg = make_cfg(tmp_path, "mode=nll", "model=exact", override)
    with pytest.raises(UserError, match=rf"^{re.escape(key)}=") as err:
        validate_likelihood(cfg)
    assert "allowed" in str(err.value) and "\n" not in str(err.value)


def test_bad_likelihood_value_stops_mode_nll_before_any_work(tmp_path):
    with pytest.raises(UserError, match="likelihood.backend='foo'"):
        run(tmp_path, "out", "mode=nll", "likelihood.backend=foo")
    assert not (tmp_path / "nll_cache").exists()


def test_scipy_backend_takes_its_own_solver_names(tmp_path):
    validate_likelihood(make_cfg(tmp_path, "likelihood.backend=scipy", "likelihood.solver=LSODA"))
    with pytest.raises(UserError, match="likelihood.solver='LSODA'.*backend=perpoint"):
        validate_likelihood(make_cfg(tmp_path, "likelihood.solver=LSODA"))


def test_no_checkpoint_says_train_first(tmp_path):
    with pytest.raises(UserError, match="train first"):
        run(tmp_path, "out", "mode=nll")


def _per_point(root: Path, summary: dict) -> list[float]:
    """Each point's log p in test-split order, read from the run's cached batches."""
    files = sorted((root / summary["cache_dir"]).glob("batch_*.json"))
    return [v for f in files for v in json.loads(f.read_text())["logp"]]


def test_a_points_value_is_the_same_in_any_batch_size(tmp_path):
    """mode=nll (per-point solves, probes keyed by each point's index): every point's log p is
    the same in batches of 12, 5 and 1 (Hutchinson, float64: within 1e-12 nats)."""
    common = ("mode=nll", "model=exact", "likelihood.n_points=12", "likelihood.dtype=float64",
              "likelihood.divergence=hutchinson")  # fmt: skip
    values = []
    for size in (12, 5, 1):
        _, s, _ = run(tmp_path / str(size), "out", *common, f"likelihood.batch_size={size}")
        values.append(torch.tensor(_per_point(tmp_path / str(size), s)))
        assert s["nfe_max"] >= s["nfe_mean"] > 0
    for other in values[1:]:
        assert float((other - values[0]).abs().max()) <= 1e-12


def test_dequantization_options(digits_run, tmp_path):
    """likelihood.dequantization=truncated_normal with importance_samples=2 runs on digits and
    says so in nll.json; on continuous data, or with K < 1, they are refused in one line."""
    _, s, _ = run(
        digits_run, "nll/tn", "mode=nll", *DIGITS, "likelihood.n_points=2",
        "likelihood.rtol=1e-3", "likelihood.atol=1e-3",
        "likelihood.dequantization=truncated_normal", "likelihood.importance_samples=2",
    )  # fmt: skip
    assert s["dequantization"] == "truncated_normal" and s["importance_samples"] == 2
    assert math.isfinite(s["bpd"]) and s["bpd"] > 0 and s["nfe_mean"] > 0
    with pytest.raises(UserError, match="data=gmm8 is continuous"):
        run(tmp_path, "out", "mode=nll", "model=exact", "likelihood.importance_samples=4")
    bad_inputs = (
        ("likelihood.importance_samples=0", "likelihood.importance_samples"),
        ("likelihood.dequantization=foo", "likelihood.dequantization='foo'"),
    )
    for bad, words in bad_inputs:
        with pytest.raises(UserError, match=words):
            validate_likelihood(make_cfg(tmp_path, bad))
