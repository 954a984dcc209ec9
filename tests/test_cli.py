"""run.py end to end in a subprocess: a real run, and bad input ending in one line with exit 2.
(run.py under torchrun: test_distributed.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runs import CONF, compose_cfg

from tasks import validate

ROOT = Path(__file__).resolve().parents[1]


# sample the newest training run (64 samples, fast on its shipped table: no fit)
SAMPLE_64 = ("mode=sample", "sampler=fast", "sampler.grid=null", "sampler.n_samples=64",
             "logger.mode=disabled")  # fmt: skip


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# Bad input: (overrides, what the one line must name, how it is run). Every kind of failure goes
# through run.py in a subprocess once ("cli": the overrides checked before Hydra's entry, a
# config-value check, a run-time lookup, a data file); the other config-value and run-time cases
# raise the same UserError through the same `tasks.dispatch` that run.py calls, so they are run
# in-process ("dispatch": the message is one line naming the value; run.py prints a UserError as
# that one line with exit 2, as the "cli" cases check). A subprocess costs ~3 s of CPU (it
# imports torch); the in-process cases cost milliseconds.
BAD_INPUT = [
    (["sde=foo"], "sde=foo", "cli"),
    (["sde.beta_min=30"], "sde.beta_min=30", "dispatch"),
    (["training.lr=-1"], "training.lr=-1", "cli"),
    (["training.batch_size=0"], "training.batch_size=0", "dispatch"),
    (["training.loss=nope"], "training.loss='nope'", "dispatch"),
    (["mode=sample", "ckpt=/nonexistent"], "ckpt=/nonexistent", "dispatch"),
    (["mode=sample"], "train first", "cli"),
    (["data=npz", "data.path=/nonexistent.npz"], "/nonexistent.npz", "cli"),
    (["mode=fly"], "mode='fly'", "dispatch"),
    (["training.nosuchkey=1"], "training.nosuchkey", "cli"),
    (["model=exact"], "nothing to train", "dispatch"),
    (["sampler=ddim", "sde=ve"], "ddim", "dispatch"),
    (["sampler=pc", "sampler.snr=0"], "sampler.snr=0", "dispatch"),
    (["sampler=pc", "sampler.predictor=magic"], "sampler.predictor='magic'", "dispatch"),
]


@pytest.mark.parametrize("args,needle,via", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle, via):
    if via == "dispatch":
        from runs import run_mode

        from tasks import UserError

        with pytest.raises(UserError) as e:
            run_mode(tmp_path, "bad", *args)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not list(tmp_path.glob("*/bad/*")), "nothing written for refused input"
        return
    r = run_py(*args, "logger.mode=disabled", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("group", sorted(p.name for p in CONF.iterdir() if p.is_dir()))
def test_every_option_of_every_group_composes_and_validates(tmp_path, group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        extra = []
        if group == "data" and option in ("npz", "folder", "cifar10"):
            extra = [f"data.path={tmp_path}"]
        if group == "model" and option == "exact":
            extra = ["mode=sample"]
        if group == "model" and option == "diffusers":
            extra = [f"model.path={tmp_path}"]
        key = group
        if group == "experiment":  # the paper presets: +experiment=NAME (package _global_)
            key, extra = "+experiment", [f"data.path={tmp_path}"]
        cfg = compose_cfg(tmp_path, f"{key}={option}", *extra)
        validate(cfg)  # raises UserError on a bad value
        if "name" in cfg.get(group, {}):  # the option was the one composed
            assert cfg[group]["name"] == option, (group, option, cfg[group]["name"])


def test_the_three_usage_commands_chain_without_paths(tmp_path):
    """README: train (with the wandb logger offline), then sample and nll find the newest
    matching checkpoint on their own."""
    r = run_py("sde=vp", "mode=train", "training.steps=40", "logger.mode=offline", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "outputs in" in r.stdout
    ckpts = list((tmp_path / "outputs" / "train").glob("*_vp_gmm8/checkpoints/ckpt_00000040.pt"))
    assert len(ckpts) == 1
    run_dir = ckpts[0].parents[1]
    assert (run_dir / "loss.png").is_file() and (run_dir / "train.json").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run not written"
    r = run_py(
        "mode=sample",
        "sampler=pc",
        "sampler.steps=20",
        "sampler.n_samples=100",
        "logger.mode=disabled",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "using checkpoint" in r.stdout and "ckpt_00000040.pt" in r.stdout
    r = run_py(
        "mode=nll",
        "likelihood.n_points=20",
        "likelihood.rtol=1e-3",
        "likelihood.atol=1e-3",
        "logger.mode=disabled",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ckpt_00000040.pt" in r.stdout
    for mode, name in (("sample", "metrics.json"), ("nll", "nll.json")):
        assert len(list((tmp_path / "outputs" / mode).glob(f"*_vp_gmm8/{name}"))) == 1


@pytest.mark.slow  # 10-20 s: too long for the default run (CI runs -m slow too)
def test_hydra_flags_and_sweeps_work_as_in_any_hydra_app(tmp_path):
    r = run_py("--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0 and "beta_max: 20.0" in r.stdout, r.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()
    r = run_py("--info", "defaults", cwd=tmp_path)
    assert r.returncode == 0 and "sde/vp" in r.stdout, r.stderr[-2000:]
    r = run_py("-m", "training.steps=30,40", "logger.mode=disabled", "progress=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = sorted((tmp_path / "outputs" / "train").glob("*_sweep/*/train.json"))
    assert [json.loads(p.read_text())["step"] for p in jobs] == [30, 40]
    # a sweep's jobs are found by mode=sample like any other training run
    r = run_py(
        "mode=sample",
        "sampler=fast",
        "sampler.grid=null",
        "sampler.n_samples=50",
        "logger.mode=disabled",
        cwd=tmp_path,
    )
    assert r.returncode == 0 and "_sweep/1_vp_gmm8" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-m", "sde=vp,foo"], "sde=foo is not a known sde config"),
        (["sde=vp,ve"], "add -m"),
        (["outputs_root=/proc/nope/outputs"], "outputs_root=/proc/nope/outputs is not a writable"),
        (["hydra/launcher=submitit_slurm"], "pip install -e '.[slurm]'"),
        pytest.param(
            ["device=cuda"],
            "device=cuda but no CUDA device",
            marks=pytest.mark.skipif(_has_cuda(), reason="needs a machine without CUDA"),
        ),
    ],
)
def test_more_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    r = run_py(*args, "logger.mode=disabled", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not list(tmp_path.glob("outputs/*/*")), "no run folder for a refused command"


@pytest.mark.slow  # 10-20 s: too long for the default run (CI runs -m slow too)
def test_lookup_prefers_finished_runs_and_all_non_finite_samples_exit_2(tmp_path):
    r = run_py(
        "training.lr=1e9",
        "training.max_bad_steps=3",
        "training.steps=50",
        "logger.mode=disabled",
        "progress=false",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "non-finite" in r.stderr, r.stderr[-2000:]
    status = json.loads(next(tmp_path.glob("outputs/train/*/train.json")).read_text())
    assert status["status"] == "failed"
    # only the failed run: it is used and said so; its samples are all non-finite (lr=1e9
    # diverged), so the run ends with one line naming the checkpoint and its run, writing nothing
    r = run_py(*SAMPLE_64, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "newest failed one: step" in r.stdout and "of 50 planned" in r.stdout
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "all 64 samples hold NaN or inf" in errors[0], r.stderr
    assert "ckpt_" in errors[0] and "of 50 planned, training run failed" in errors[0]
    assert not list(tmp_path.glob("outputs/sample/*/samples.npz"))
    # a finished run made before a later failed one is preferred to it (the two training runs
    # in-process, as run.py would run them, into the same outputs folder: a run.py process costs
    # ~3 s of CPU for its imports)
    from runs import run_mode

    from tasks import UserError

    summary, _ = run_mode(tmp_path / "outputs", "finished", "training.steps=20")
    assert summary["status"] == "finished"
    with pytest.raises(UserError, match="non-finite"):
        run_mode(
            tmp_path / "outputs",
            "failed",
            "training.lr=1e9",
            "training.max_bad_steps=3",
            "training.steps=50",
        )
    assert json.loads((tmp_path / "outputs/train/failed/train.json").read_text())["status"] == (
        "failed"
    )
    r = run_py(*SAMPLE_64, cwd=tmp_path)
    assert r.returncode == 0 and "newest finished" in r.stdout, r.stdout[-2000:]
    assert "train/finished/" in r.stdout, r.stdout[-2000:]
