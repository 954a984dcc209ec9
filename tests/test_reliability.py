"""Reliability: every test performs its fault on a real run and checks what is left behind.

Checkpoints: a malicious pickle, a truncated or garbage file, a config mismatch, NaN weights.
Crashes: SIGTERM / SIGINT and SIGKILL sent to `python run.py` mid-training, then resume=true.
Numerics: NaN losses and gradients injected into the training loop, NaN weights at a save.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs import compose_cfg, log_lines, run_mode

from tasks import UserError, dispatch
from tasks.common import load_score_model
from training import EMA, NonFiniteError, TrainSettings, make_loss, train
from training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_BUILT = (ROOT / "tasks" / "sample.py").is_file()
# A small MLP on gmm8: a step takes a few ms, so the runs below are dominated by process start-up.
TINY = [
    "model=mlp",
    "model.hidden=32",
    "model.depth=2",
    "training.batch_size=64",
    "training.warmup=10",
    "training.log_every=5",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}


class Payload:
    """Unpickling this runs `touch marker`, as a crafted checkpoint would run anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def spawn(root: Path, args: list[str], log: Path) -> subprocess.Popen:
    """run.py in the background with its outputs under root, stdout+stderr to `log`."""
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        f"outputs_root={root}",
        "logger.mode=disabled",
        "progress=false",
        *args,
    ]
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd,
            cwd=root.parent,
            env=ENV,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_py_all(cases: dict[str, list[str]], cwd: Path) -> dict[str, tuple[int, str, str]]:
    """Run several run.py commands at once: {name: (exit code, stdout, stderr)}."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), "logger.mode=disabled", "progress=false", *args],
            cwd=cwd,
            env=ENV,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, args in cases.items()
    }
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = (p.returncode, stdout, stderr)
    return out


def one_error_line(result: tuple[int, str, str]) -> str:
    code, stdout, stderr = result
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr[-2000:])
    assert "Traceback" not in stdout + stderr
    return lines[0]


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def all_checkpoints(root: Path) -> list[Path]:
    return sorted(p for d in root.glob("train/*/checkpoints") for p in ckpt.list_checkpoints(d))


def assert_finite(state: dict) -> None:
    assert ckpt.non_finite(state) == []
    for part in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in state[part].values())


def dispatch_logged(root: Path, name: str, *overrides: str) -> tuple[dict, Path, list[str]]:
    """tasks.dispatch in-process (as run.py would), keeping its log lines."""
    cfg = compose_cfg(root, *overrides)
    out = Path(root) / cfg["mode"] / name
    out.mkdir(parents=True, exist_ok=True)
    with log_lines() as lines:
        summary = dispatch(cfg, out)
    return summary, out, lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny finished run (20 steps, a checkpoint every 5, keep 3): (outputs_root, run dir)."""
    root = tmp_path_factory.mktemp("trained")
    _, out = run_mode(
        root, "run", *TINY, "training.steps=20", "training.ckpt_every=5", "training.keep=3"
    )
    return root, out


def copy_run(trained, dest_root: Path) -> Path:
    """A private copy of the trained run under dest_root/train/ (so a test may damage it)."""
    dest = dest_root / "train" / "run"
    shutil.copytree(trained[1], dest)
    return dest


def malicious_checkpoint(good: Path, path: Path, marker: Path) -> Path:
    """A real checkpoint with one extra entry whose unpickling runs a command, saved as torch.save
    would (zip archive), so only the restricted unpickler stands between it and the command."""
    state = torch.load(good, weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, path)
    return path


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_files_keep_k_carry_a_format_version_and_leave_no_temp_files(trained):
    _, out = trained
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["ckpt_00000010.pt", "ckpt_00000015.pt", "ckpt_00000020.pt"]  # keep=3
    for p in ckpt.list_checkpoints(out / "checkpoints"):
        state = ckpt.load(p)
        assert state["format_version"] == ckpt.FORMAT_VERSION == 1
        assert state["step"] == int(p.stem[-8:])
        assert_finite(state)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_malicious_pickle_is_refused_and_its_code_never_runs(tmp_path, trained):
    good = ckpt.list_checkpoints(trained[1] / "checkpoints")[-1]
    marker = tmp_path / "PWNED"
    # the payload is live: plain unpickling (what an unrestricted load does) runs it
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof)))
    assert proof.exists()
    evil_zip = malicious_checkpoint(good, tmp_path / "evil.pt", marker)
    evil_pickle = tmp_path / "evil_pickle.pt"
    evil_pickle.write_bytes(pickle.dumps({"model": {}, "payload": Payload(marker)}))
    for path, why in ((evil_zip, "Python objects"), (evil_pickle, "not a PyTorch checkpoint")):
        with pytest.raises(ckpt.CheckpointError, match=why) as e:
            ckpt.load(path)
        assert str(path) in str(e.value)
    # planted as the newest checkpoint of a run: resume and sample fall back to the good one
    run = copy_run(trained, tmp_path / "planted")
    shutil.copy(evil_zip, ckpt.checkpoint_path(run / "checkpoints", 25))
    path, state = ckpt.latest_valid(run / "checkpoints")
    assert path.name == "ckpt_00000020.pt" and state["step"] == 20
    cfg = compose_cfg(tmp_path / "planted", "mode=sample", *TINY)
    assert load_score_model(cfg)[3].name == "ckpt_00000020.pt"
    assert not marker.exists()


@pytest.mark.slow  # 10-20 s: too long for the default run (CI runs -m slow too)
def test_bad_checkpoints_through_run_py_exit_2_with_one_line(tmp_path, trained):
    """Malicious, truncated, garbage and mismatched checkpoints given to nll, resume and sample:
    one line naming the file and the problem, and the malicious code never runs. run.py runs the
    three modes' loading paths in subprocesses; the other cases go through tasks.dispatch."""
    good = ckpt.list_checkpoints(trained[1] / "checkpoints")[-1]
    marker = tmp_path / "PWNED"
    evil = malicious_checkpoint(good, tmp_path / "evil.pt", marker)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(random.Random(0).randbytes(4096))
    cases = {
        "nll evil": ["mode=nll", f"ckpt={evil}"],
        "resume evil": [*TINY, "resume=true", f"ckpt={evil}"],
        "nll truncated": ["mode=nll", f"ckpt={truncated}"],
        "resume garbage": [*TINY, "resume=true", f"ckpt={garbage}"],
        "nll other sde": ["mode=nll", "sde.beta_max=10", f"ckpt={good}"],
        "resume other model": [
            "model=mlp",
            "model.hidden=64",
            "model.depth=2",
            "resume=true",
            f"ckpt={good}",
        ],
    }
    if SAMPLE_BUILT:
        cases["sample evil"] = ["mode=sample", f"ckpt={evil}"]
    # each mode's loading path through run.py once (a subprocess costs ~3 s of CPU); the other
    # cases raise the same UserError through tasks.dispatch, which run.py prints as one line
    cli = {"nll evil", "resume garbage", "sample evil"}
    results = run_py_all({k: v for k, v in cases.items() if k in cli}, tmp_path)
    lines = {name: one_error_line(result) for name, result in results.items()}
    for name, args in cases.items():
        if name not in cli:
            with pytest.raises(UserError) as e:
                run_mode(tmp_path / "in_process", name.replace(" ", "_"), *args)
            lines[name] = str(e.value)
            assert "\n" not in lines[name], lines[name]
    for name, line in lines.items():
        path = {"evil": evil, "truncated": truncated, "garbage": garbage}.get(
            name.split()[-1], good
        )
        assert str(path) in line, (name, line)
        if "evil" in name:
            assert "Python objects" in line, line
    assert "truncated" in lines["nll truncated"]
    assert "not a PyTorch checkpoint" in lines["resume garbage"]
    assert "sde.beta_max: run=10" in lines["nll other sde"]
    assert "model.hidden: run=64 checkpoint=32" in lines["resume other model"]
    assert not marker.exists()


def test_truncated_and_garbage_checkpoints_are_named_and_resume_falls_back(tmp_path, trained):
    run = copy_run(trained, tmp_path)
    newest, middle, oldest = reversed(ckpt.list_checkpoints(run / "checkpoints"))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut in half
    middle.write_bytes(random.Random(1).randbytes(middle.stat().st_size))  # garbage
    with pytest.raises(ckpt.CheckpointError, match="truncated") as e:
        ckpt.load(newest)
    assert str(newest) in str(e.value)
    with pytest.raises(ckpt.CheckpointError, match="not a PyTorch checkpoint") as e:
        ckpt.load(middle)
    assert str(middle) in str(e.value)
    summary, out, lines = dispatch_logged(
        tmp_path, "resumed", *TINY, "training.steps=25", "resume=true"
    )
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warnings) == 2 and str(newest) in warnings[0] and str(middle) in warnings[1]
    assert f"resuming from {oldest} at step 10" in lines
    assert summary["status"] == "finished" and summary["step"] == 25
    assert_finite(ckpt.load(ckpt.list_checkpoints(out / "checkpoints")[-1]))


def test_nan_and_foreign_checkpoints_are_refused_and_skipped(tmp_path, trained):
    run = copy_run(trained, tmp_path)
    good = ckpt.list_checkpoints(run / "checkpoints")[-1]
    state = torch.load(good, weights_only=True)
    name = next(iter(state["ema"]))
    state["ema"][name] = torch.full_like(state["ema"][name], float("nan"))
    nan_path = ckpt.checkpoint_path(run / "checkpoints", 30)
    with pytest.raises(ckpt.CheckpointError, match="non-finite"):
        ckpt.save(nan_path, state)  # the library refuses to write it ...
    assert not nan_path.exists() and not list((run / "checkpoints").glob("*.tmp"))
    torch.save(state, nan_path)  # ... and refuses to use one written behind its back
    with pytest.raises(ckpt.CheckpointError, match=f"non-finite weights \\(ema.{name}"):
        ckpt.load(nan_path)
    future = ckpt.checkpoint_path(run / "checkpoints", 35)
    torch.save({**torch.load(good, weights_only=True), "format_version": 2}, future)
    with pytest.raises(ckpt.CheckpointError, match="format version 2"):
        ckpt.load(future)
    assert ckpt.latest_valid(run / "checkpoints")[0] == good


def test_config_mismatch_is_refused_with_the_keys_named(tmp_path, trained):
    root, out = trained
    good = ckpt.list_checkpoints(out / "checkpoints")[-1]

    def load(*overrides):
        return load_score_model(compose_cfg(root, *overrides))

    # an explicit ckpt=PATH brings its own model config: model.hidden=64 yields its hidden=32
    _, _, model, path = load("mode=sample", "model=mlp", "model.hidden=64", f"ckpt={good}")
    assert path == good
    assert all(torch.equal(v, ckpt.load(good)["ema"][k]) for k, v in model.state_dict().items())
    # ... but its SDE and data must match the run
    with pytest.raises(UserError, match=r"sde\.beta_max: run=10 checkpoint=20\.0"):
        load("mode=sample", "sde.beta_max=10", f"ckpt={good}")
    with pytest.raises(UserError, match="data.name: run='moons' checkpoint='gmm8'"):
        load("mode=sample", "data=moons", f"ckpt={good}")
    with pytest.raises(UserError, match="sde.name: run='ve' checkpoint='vp'"):
        load("mode=nll", "sde=ve", f"ckpt={good}")
    # without ckpt the newest sde/data run is taken and its model must match too
    with pytest.raises(UserError, match="model.hidden: run=64 checkpoint=32"):
        load("mode=sample", "model=mlp", "model.hidden=64", "model.depth=2")
    # resume continues the same model only
    for extra in ([], [f"ckpt={good}"]):
        with pytest.raises(UserError, match="model.hidden: run=64 checkpoint=32"):
            dispatch_logged(
                root,
                "changed",
                "model=mlp",
                "model.hidden=64",
                "model.depth=2",
                "training.steps=25",
                "resume=true",
                *extra,
            )


# --------------------------------------------------------------------------- crashes


@pytest.mark.slow  # 10-20 s: too long for the default run (CI runs -m slow too)
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_0(tmp_path):
    args = [*TINY, "training.steps=100000", "training.ckpt_every=20"]
    runs = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            (tmp_path / sig.name).mkdir()
            runs[sig] = spawn(tmp_path / sig.name, args, tmp_path / f"{sig.name}.log")
        for sig, proc in runs.items():
            root = tmp_path / sig.name
            wait_for(lambda r=root: all_checkpoints(r), 120, f"a checkpoint before {sig.name}")
            time.sleep(0.3)
            proc.send_signal(sig)
        codes = {sig: proc.wait(timeout=60) for sig, proc in runs.items()}
    finally:
        for proc in runs.values():
            proc.kill()
    for sig in runs:
        root, log = tmp_path / sig.name, (tmp_path / f"{sig.name}.log").read_text()
        assert codes[sig] == 0, log[-2000:]
        assert f"received signal {int(sig)}: saving a checkpoint" in log
        summary = json.loads(next(root.glob("train/*/train.json")).read_text())
        assert summary["status"] == "interrupted" and 20 <= summary["step"] < 100000
        assert Path(summary["checkpoint"]) == all_checkpoints(root)[-1]
        state = ckpt.load(summary["checkpoint"])
        assert state["step"] == summary["step"]
        assert_finite(state)


class Signalling:
    """Wraps a loss; at one call sends SIGTERM to this process `times` times."""

    def __init__(self, loss, at: int, times: int) -> None:
        self.loss, self.at, self.times, self.calls = loss, at, times, 0

    def __call__(self, net, x0, g):
        self.calls += 1
        if self.calls == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # let the handler run
        return self.loss(net, x0, g)


def test_one_signal_in_process_stops_cleanly_and_a_second_aborts_at_once(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    cfg, sde, ds, model, s = small_setup(50, ckpt_every=100)
    result = train(
        model,
        Signalling(make_loss("dsm", sde), 5, 1),
        ds,
        s,
        tmp_path / "one",
        config=cfg,
        progress=False,
    )
    assert (result.status, result.step) == ("interrupted", 5)
    assert ckpt.load(result.checkpoint)["step"] == 5
    with pytest.raises(KeyboardInterrupt):
        train(
            model,
            Signalling(make_loss("dsm", sde), 5, 2),
            ds,
            s,
            tmp_path / "two",
            config=cfg,
            progress=False,
        )
    assert not (tmp_path / "two").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the loop's handler is gone


KILL_MID_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
from training import checkpoint as ckpt
state, real_save = ckpt.load(sys.argv[2]), torch.save
def save_half_then_die(obj, f):
    real_save(obj, f)
    f.truncate(f.tell() // 2)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_then_die
state["step"] = 99
ckpt.save(sys.argv[2], state)
"""


def test_sigkill_in_the_middle_of_a_save_leaves_the_old_checkpoint(tmp_path, trained):
    run = copy_run(trained, tmp_path)
    target = ckpt.list_checkpoints(run / "checkpoints")[-1]
    before = target.read_bytes()
    r = subprocess.run(
        [sys.executable, "-c", KILL_MID_SAVE, str(ROOT), str(target)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    partial = list((run / "checkpoints").glob(".ckpt_*.tmp"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < len(before)  # died mid-write
    assert target.read_bytes() == before and ckpt.load(target)["step"] == 20
    assert ckpt.list_checkpoints(run / "checkpoints")[-1] == target
    assert ckpt.latest_valid(run / "checkpoints")[0] == target


def step_of(path: Path) -> int:
    return int(path.stem[-8:])


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_reaches_the_uninterrupted_parameters(tmp_path):
    """5 SIGKILLs at seeded random moments while checkpoints are written every 5 steps.

    Four kills land a random 0-50 ms after the run passes a seeded random step (so they are spread
    over the run whatever the machine's speed); one lands 0.2-1.5 s after start-up began.

    Slow (six run.py processes; ~25 s of CPU). In the default run a kill in the middle of a save
    (test_sigkill_in_the_middle_of_a_save_leaves_the_old_checkpoint), truncated and garbage
    checkpoints with resume falling back (test_truncated_and_garbage_checkpoints_are_named_and_
    resume_falls_back), SIGTERM / SIGINT saves (test_sigterm_and_sigint_save_a_checkpoint_and_
    exit_0) and exact resume (test_training.py::test_resume_reaches_the_same_parameters) are
    checked one at a time.
    """
    total = 400
    args = [*TINY, f"training.steps={total}", "training.ckpt_every=5", "training.keep=2"]
    root, rng = tmp_path / "killed", random.Random(0)
    root.mkdir()
    targets = sorted(rng.sample(range(20, 300), 4))
    plan = [targets[0], targets[1], None, targets[2], targets[3]]  # None: timed from the start
    live_kills, last_step, record = 0, None, []
    for i, target in enumerate(plan):
        seen = set(all_checkpoints(root))
        log = tmp_path / f"run{i}.log"
        proc = spawn(root, [*args, *(["resume=true"] if i else [])], log)
        try:
            if target is None:  # during start-up, or at the latest at this run's first checkpoint
                end = time.monotonic() + rng.uniform(0.2, 1.5)
                wait_for(
                    lambda p=proc, s=seen, e=end: (
                        p.poll() is not None
                        or time.monotonic() > e
                        or set(all_checkpoints(root)) - s
                    ),
                    120,
                    f"run {i}",
                )
            else:
                wait_for(
                    lambda p=proc, s=seen, t=target: (
                        p.poll() is not None
                        or any(step_of(c) >= t for c in set(all_checkpoints(root)) - s)
                    ),
                    120,
                    f"run {i} to pass step {target}",
                )
                time.sleep(rng.uniform(0.0, 0.05))
            alive = proc.poll() is None
        finally:
            proc.kill()
            proc.wait()
        text = log.read_text()
        assert alive or proc.returncode == 0, text[-3000:]
        live_kills += alive
        if last_step is not None and "resuming from" in text:
            assert f"at step {last_step}" in text, text[-2000:]
        states = [ckpt.load(p) for p in all_checkpoints(root)]  # every file that is named loads
        for s in states:
            assert_finite(s)
        last_step = max((s["step"] for s in states), default=None)
        record.append(f"{target or 'start'}->{last_step}")
    leftovers = [p.name for p in root.rglob("*.tmp")]
    print(
        f"\n{live_kills} kills of live runs (target step->newest checkpoint: {', '.join(record)}); "
        f"{len(leftovers)} temp files left by kills mid-write: {leftovers}"
    )
    assert live_kills == 5 and last_step is not None and last_step < total

    summary, final, lines = dispatch_logged(root, "final", *args, "resume=true")
    assert summary["status"] == "finished"
    assert any(
        ln.startswith("resuming from") and ln.endswith(f"at step {last_step}") for ln in lines
    ), lines
    resumed = ckpt.load(ckpt.list_checkpoints(final / "checkpoints")[-1])
    _, ref_out = run_mode(tmp_path / "reference", "full", *args)
    reference = ckpt.load(ckpt.list_checkpoints(ref_out / "checkpoints")[-1])
    assert resumed["step"] == reference["step"] == total
    for part in ("model", "ema"):
        for name, value in reference[part].items():
            assert torch.equal(value, resumed[part][name]), (part, name)


# --------------------------------------------------------------------------- numerical faults


class Faulty:
    """Wraps a loss; on chosen calls returns a NaN loss, or a finite loss with NaN gradients."""

    def __init__(self, loss, nan_loss=(), nan_grad=(), nan_from: int | None = None) -> None:
        self.loss, self.nan_loss, self.nan_grad, self.nan_from = loss, nan_loss, nan_grad, nan_from
        self.calls = 0

    def __call__(self, net, x0, g):
        self.calls += 1
        out = self.loss(net, x0, g)
        if self.calls in self.nan_loss or (self.nan_from and self.calls >= self.nan_from):
            return out * float("nan")
        if self.calls in self.nan_grad:  # d sqrt(u)/du = inf at u = 0, times 0: NaN gradients
            p = next(iter(net.parameters()))
            return out + torch.sqrt(p.sum() * 0.0)
        return out


def small_setup(steps: int, **settings):
    from tasks.common import build_dataset, build_score_model, build_sde

    cfg = compose_cfg("/tmp", *TINY)
    sde, ds = build_sde(cfg["sde"]), build_dataset(cfg["data"])
    model = build_score_model(cfg, sde, ds)
    s = TrainSettings(steps=steps, batch_size=64, lr=2e-3, warmup=10, log_every=5, **settings)
    return cfg, sde, ds, model, s


def test_nan_losses_and_gradients_are_skipped_and_counted(tmp_path):
    cfg, sde, ds, model, s = small_setup(20, ckpt_every=10, max_bad_steps=3)
    loss = Faulty(make_loss("dsm", sde), nan_loss=(3, 4, 9), nan_grad=(6, 7))
    result = train(model, loss, ds, s, tmp_path, config=cfg, progress=False)
    # a skipped step uses up its iteration (its batch is a function of the step) and changes
    # nothing: 20 iterations, 5 of them skipped on the device without a host round trip
    assert (result.status, result.step, result.skipped_steps) == ("finished", 20, 5)
    assert loss.calls == 20
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for path in ckpt.list_checkpoints(tmp_path / "checkpoints"):
        state = ckpt.load(path)
        assert_finite(state)
        assert state["skipped_steps"] == 5


def test_persistent_nan_stops_with_a_clear_error_and_keeps_good_checkpoints(tmp_path, monkeypatch):
    import tasks.train

    monkeypatch.setattr(
        tasks.train, "make_loss", lambda *a, **k: Faulty(make_loss(*a, **k), nan_from=13)
    )
    with pytest.raises(UserError, match="4 non-finite losses/gradients in a row at step 16"):
        dispatch_logged(
            tmp_path,
            "nan",
            *TINY,
            "training.steps=100",
            "training.ckpt_every=5",
            "training.max_bad_steps=4",
        )
    paths = ckpt.list_checkpoints(tmp_path / "train" / "nan" / "checkpoints")
    assert [p.name for p in paths] == ["ckpt_00000010.pt", "ckpt_00000015.pt", "ckpt_00000016.pt"]
    for p in paths:  # the good ones, and the last good state saved on the way out
        state = ckpt.load(p)
        assert_finite(state)
    assert state["skipped_steps"] == 4 and state["step"] == 16
    # through the loop itself: NonFiniteError, and nothing saved when no good step was taken
    cfg, sde, ds, model, s = small_setup(10, max_bad_steps=2)
    with pytest.raises(NonFiniteError, match="last good checkpoint: none"):
        train(
            model,
            Faulty(make_loss("dsm", sde), nan_from=1),
            ds,
            s,
            tmp_path / "none",
            config=cfg,
            progress=False,
        )
    assert not (tmp_path / "none" / "checkpoints").exists()


def test_nan_weights_are_never_saved_over_a_good_checkpoint(tmp_path, monkeypatch):
    update = EMA.update

    def poisoned(self, model, n_updates, mask=None):  # the EMA turns NaN at its 8th update
        update(self, model, n_updates, mask)
        if n_updates == 7:
            next(iter(self.shadow.parameters())).data.fill_(float("nan"))

    monkeypatch.setattr(EMA, "update", poisoned)
    cfg, sde, ds, model, s = small_setup(20, ckpt_every=5)
    with pytest.raises(NonFiniteError, match=r"non-finite weights \(ema\..*at step 10"):
        train(model, make_loss("dsm", sde), ds, s, tmp_path, config=cfg, progress=False)
    paths = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in paths] == ["ckpt_00000005.pt"]
    assert_finite(ckpt.load(paths[0]))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_runs_saved_before_a_config_key_existed_still_match():
    """sde.schedule (linear | cosine) came after runs were saved without it: a missing key and
    its default are the same run; another value is not; data loading options never count."""
    from tasks.common import run_identity

    old = {
        "sde": {"name": "vp", "beta_min": 0.1, "beta_max": 20.0},
        "data": {"name": "digits", "levels": 17},
        "model": {"name": "unet"},
    }
    new = {
        **old,
        "sde": {**old["sde"], "schedule": "linear"},
        "data": {**old["data"], "workers": 2, "random_flip": True},
    }
    assert run_identity(old) == run_identity(new)
    cosine = {**old, "sde": {**old["sde"], "schedule": "cosine"}}
    assert run_identity(old) != run_identity(cosine)
