"""Two processes (torchrun, gloo on 127.0.0.1, a free port) against one: training, sampling and
likelihood give the same numbers, also when the ranks share no file system (each its own
outputs_root); a killed rank ends the run with one line, by itself."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import compose_cfg, free_port, run_mode

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
QUIET = ("logger.mode=disabled", "progress=false")


def torchrun(*args: str, cwd: Path, timeout: float = 300, popen: bool = False, env=None):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
    ]
    env = {**ENV, **(env or {})}
    if popen:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_ranks_agree_after_every_step_and_match_one_process(tmp_path):
    """Global batch 24 as 2 ranks x 12 in micro-batches of 5 (accumulation) vs one process with
    the whole batch at once: same batches, same per-example noise, same parameters."""
    steps, batch = 6, 24
    r = torchrun(
        str(ROOT / "tests" / "dist_train_check.py"),
        str(tmp_path),
        str(steps),
        str(batch),
        "5",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    two = torch.load(tmp_path / "dist.pt", weights_only=True)
    assert two["worst"].numel() == steps and float(two["worst"].max()) == 0.0

    from dist_train_check import DATA, flat

    from tasks.common import build_dataset, build_score_model, build_sde
    from training.loop import TrainSettings, train
    from training.losses import make_loss

    cfg = compose_cfg(tmp_path, *DATA)
    sde, ds = build_sde(cfg["sde"]), build_dataset(cfg["data"])
    model = build_score_model(cfg, sde, ds)
    start = flat(model).clone()
    s = TrainSettings(
        steps=steps,
        batch_size=batch,
        lr=1e-3,
        warmup=2,
        log_every=2,
        ckpt_every=1000,
        random_flip=True,
    )
    train(model, make_loss("dsm", sde), ds, s, tmp_path / "one", config=cfg, progress=False)
    one = flat(model)
    moved = float((one - start).abs().max())
    # float tolerance: the same sums in another order; far below how far the weights moved
    assert float((one - two["params"]).abs().max()) < 1e-5 < moved / 100


@pytest.mark.slow
def test_sample_with_two_processes_writes_one_folder_equal_to_one_process(tmp_path):
    """Two ranks sharing one outputs_root (one machine), batches of 2, against one process with
    batches of 16: every point's value is the same. Slow: the ranks exchange their results
    through the same collectives as in the default run's
    test_sample_on_machines_sharing_no_files_equals_one_process."""
    args = (
        "mode=sample",
        "model=exact",
        "sampler=em",
        "sampler.steps=200",
        "sampler.n_samples=1200",
        "sampler.batch_size=250",
        *QUIET,
    )
    r = torchrun(str(ROOT / "run.py"), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    folders = list((tmp_path / "outputs" / "sample").iterdir())
    assert len(folders) == 1 and not list(tmp_path.glob("outputs/**/.shards"))
    metrics = json.loads((folders[0] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["n_samples"] == 1200
    two = np.load(folders[0] / "samples.npz")["samples"]
    # one process, another batch size: every sample has its own noise stream
    _, out = run_mode(tmp_path / "one", "one", *args[:-2], "sampler.batch_size=400")
    one = np.load(out / "samples.npz")["samples"]
    assert two.shape == (1200, 2)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_nll_with_two_processes_equals_one_process(tmp_path):
    """Two ranks sharing one outputs_root (one machine), batches of 2, against one process with
    batches of 16: every point's value is the same. Slow: the ranks exchange their results
    through the same collectives as in the default run's
    test_nll_on_machines_sharing_no_files_equals_one_process_and_resumes."""
    args = (
        "mode=nll",
        "model=exact",
        "likelihood.n_points=16",
        "likelihood.batch_size=2",
        "likelihood.divergence=hutchinson",
        "likelihood.n_probes=2",
        *QUIET,
    )
    r = torchrun(str(ROOT / "run.py"), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (folder,) = list((tmp_path / "outputs" / "nll").iterdir())
    two = json.loads((folder / "nll.json").read_text())
    assert two["world_size"] == 2 and two["batches_reused"] == 0
    # each rank solved its own batches (0, 2, 4 ... and 1, 3, 5 ...) with its own step counts
    cached = sorted((tmp_path / two["cache_dir"]).glob("batch_*.json"))
    nfe = [json.loads(p.read_text())["nfe"][0] for p in cached]
    assert len(nfe) == 8 and sum(nfe[0::2]) != sum(nfe[1::2])
    # one process with another batch size: the per-point solves and keyed probes give each point
    # the same value (float32: within 1e-5 relative, the score's rounding on other row counts)
    alone = [a if a != "likelihood.batch_size=2" else "likelihood.batch_size=16" for a in args[:-2]]
    one, _ = run_mode(tmp_path / "one", "one", *alone)
    for key in ("nll_nats", "stderr", "hutchinson_stderr", "exact_nll_nats", "gap", "nfe_mean"):
        assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-6), key

    def per_point(summary: dict, root: Path) -> list[float]:
        files = sorted((root / summary["cache_dir"]).glob("batch_*.json"))
        return [v for f in files for v in json.loads(f.read_text())["logp"]]

    assert per_point(one, tmp_path / "one") == pytest.approx(per_point(two, tmp_path), rel=1e-5)


# a tiny trained score model (gmm8, VP): seconds to train, a real checkpoint to share
TINY = ("model=mlp", "model.hidden=32", "model.depth=2", "model.emb_dim=16")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The folder of a finished training run of the TINY model (one process)."""
    root = tmp_path_factory.mktemp("tiny")
    run_mode(root, "tiny", "mode=train", *TINY, "training.steps=30")
    return root / "train" / "tiny"


def _machines(tmp_path: Path, run: Path) -> str:
    """Two 'machines' that share no file system: rank r writes and looks up under its own
    outputs_root tmp_path/rank<r> (resolved per rank from torchrun's RANK), and only rank 0's
    holds the training run. Returns the outputs_root override."""
    shutil.copytree(run, tmp_path / "rank0" / "train" / run.name)
    return f"outputs_root={tmp_path}/rank${{oc.env:RANK,0}}"


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow  # 8 s of torchrun; the default run keeps test_ranks_agree_after_every_step
def test_gather_and_share_move_every_value_in_bounded_pieces(tmp_path):
    """gather_to_main: shares of different sizes (tensors, an empty one, JSON-like values)
    reach rank 0 whole; share_from_main: rank 0's value, or its error, on every rank; no
    message on the process group is larger than the piece size (100 bytes here)."""
    r = torchrun(str(ROOT / "tests" / "dist_gather_check.py"), str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    from dist_gather_check import CHUNK, N_ITEMS, item

    got = [torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1)]
    assert got[1]["merged"] is None and sorted(got[0]["merged"]) == list(range(N_ITEMS))
    for i, v in got[0]["merged"].items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, item(i), rtol=0, atol=0)
        else:
            assert v == item(i)
    for g in got:
        torch.testing.assert_close(
            g["shared"]["weights"], torch.linspace(0, 1, 1000, dtype=torch.float64), rtol=0, atol=0
        )
        assert g["shared"]["step"] == 7 and g["error"] == "no checkpoint here"
        assert len(g["sizes"]) > 50 and max(g["sizes"]) <= CHUNK  # 8 kB in pieces of 100 B


@pytest.mark.slow  # 12 s of torchrun; the default run keeps test_ranks_agree_after_every_step
def test_sample_on_machines_sharing_no_files_equals_one_process(tiny_run, tmp_path):
    """Rank 1 has no checkpoint and no access to rank 0's folder: it receives the checkpoint and
    the schedule fitted by rank 0 (sampler.grid=fit) and sends its samples (2 of the 5 batches,
    fewer than rank 0) through the process group. The samples are bitwise those of one process
    on the same schedule file: each sample has its own noise and the same batches are drawn."""
    args = (
        "mode=sample",
        *TINY,
        "sampler=fast",
        "sampler.steps=5",
        "sampler.n_samples=300",
        "sampler.batch_size=70",
        *QUIET,
    )
    r = torchrun(
        str(ROOT / "run.py"), *args, "sampler.grid=fit", _machines(tmp_path, tiny_run), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert _files(tmp_path / "rank1") == []  # read nothing there, wrote nothing there
    (folder,) = list((tmp_path / "rank0" / "sample").iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["n_samples"] == 300
    assert metrics["options"]["grid"] == str(folder / "schedule.json")
    two = np.load(folder / "samples.npz")
    ck = next((tmp_path / "rank0" / "train").glob("*/checkpoints/ckpt_*.pt"))
    m, out = run_mode(
        tmp_path / "one",
        "one",
        *args[:-2],
        f"ckpt={ck}",
        f"sampler.grid={folder / 'schedule.json'}",
    )
    one = np.load(out / "samples.npz")
    assert m["nfe"] == metrics["nfe"] and two["samples"].shape == (300, 2)
    for key in ("samples", "samples_model_space"):
        np.testing.assert_array_equal(two[key], one[key])


@pytest.mark.slow  # 10-20 s: too long for the default run (CI runs -m slow too)
def test_nll_on_machines_sharing_no_files_equals_one_process_and_resumes(tiny_run, tmp_path):
    """Each rank solves and caches its batches under its own outputs_root; rank 0 gathers the
    per-batch results (in batch order) into the nll.json of one process, and caches the
    batches it received. A second two-process run and a one-process run on rank 0's machine
    reuse every batch."""
    args = (
        "mode=nll",
        *TINY,
        "likelihood.n_points=16",
        "likelihood.batch_size=2",
        "likelihood.divergence=hutchinson",
        "likelihood.n_probes=2",
        "likelihood.rtol=1e-3",
        "likelihood.atol=1e-3",
        *QUIET,
    )
    roots = _machines(tmp_path, tiny_run)
    r = torchrun(str(ROOT / "run.py"), *args, roots, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (folder,) = list((tmp_path / "rank0" / "nll").iterdir())
    two = json.loads((folder / "nll.json").read_text())
    assert two["world_size"] == 2 and two["batches_reused"] == 0 and two["n"] == 16
    # rank 1's own cache: its batches 1, 3, 5, 7 only, and nothing else on its machine
    rank1 = _files(tmp_path / "rank1")
    assert len(rank1) == 5 and all(f.startswith("nll_cache/") for f in rank1), rank1
    assert [Path(f).name[:11] for f in rank1 if "batch_" in f] == [
        f"batch_{i:05d}" for i in (1, 3, 5, 7)
    ]
    assert len(list(Path(two["cache_dir"]).glob("batch_*.json"))) == 8  # rank 0: all of them
    ck = next((tmp_path / "rank0" / "train").glob("*/checkpoints/ckpt_*.pt"))
    one, _ = run_mode(tmp_path / "one", "one", *args[:-2], f"ckpt={ck}")
    keys = (
        "nll_nats",
        "stderr",
        "hutchinson_stderr",
        "exact_nll_nats",
        "gap",
        "gap_stderr",
        "nfe_mean",
        "n",
    )
    assert one["batches_reused"] == 0 and {k: one[k] for k in keys} == {k: two[k] for k in keys}

    r = torchrun(str(ROOT / "run.py"), *args, roots, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(max((tmp_path / "rank0" / "nll").glob("*/nll.json")).read_text())
    assert again["batches_reused"] == 8 and {k: again[k] for k in keys} == {k: two[k] for k in keys}
    here, _ = run_mode(tmp_path / "rank0", "here", *args[:-2])  # one process, rank 0's cache
    assert here["batches_reused"] == 8 and {k: here[k] for k in keys} == {k: two[k] for k in keys}


def _rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=")[1])


@pytest.mark.slow  # 13 s of torchrun; the default run keeps test_ranks_agree_after_every_step
def test_a_killed_rank_ends_the_other_with_one_line_and_cleans_up(tmp_path):
    """SIGKILL to rank 0: rank 1 prints one line naming the lost process and resume=true, the run
    exits non-zero, and rank 1 removes its temporary Hydra folder as it leaves, which a rank that
    waited on its dead peer until torchrun's SIGKILL (30 s after its SIGTERM) would leave behind.
    No assertion on how long it takes (measured 0.4-1.2 s); the 120 s waits are hang guards."""
    args = ("training.steps=1000000", "training.ckpt_every=50", "dist_timeout_s=60", *QUIET)
    (tmp_path / "tmp").mkdir()  # where rank 1 has its temporary Hydra folder
    proc = torchrun(
        str(ROOT / "run.py"), *args, cwd=tmp_path, popen=True, env={"TMPDIR": str(tmp_path / "tmp")}
    )
    try:
        deadline = time.monotonic() + 120  # hang guard
        while not list(tmp_path.glob("outputs/train/*/checkpoints/ckpt_*.pt")):
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint"
            time.sleep(0.2)
        ranks = subprocess.run(
            ["pgrep", "-f", f"{ROOT / 'run.py'} training.steps=1000000"],
            capture_output=True,
            text=True,
        ).stdout.split()
        workers = {_rank_of(int(p)): int(p) for p in ranks if int(p) != proc.pid}
        assert sorted(workers) == [0, 1], ranks
        # rank 0: rank 1 survives, and it has a temporary Hydra folder to remove as it leaves
        os.kill(workers[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)  # hang guard
    finally:
        proc.kill()
    assert proc.returncode != 0, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("error: rank")]
    ok = lines and lines[0].startswith("error: rank 1 lost another process")
    assert ok and "resume=true" in lines[0], out[-3000:]
    assert len(lines) == 1, out[-3000:]  # one line, from the one surviving rank
    assert not list((tmp_path / "tmp").glob("scoresde-rank-*"))  # removed although it left at once


def _workers(proc: subprocess.Popen, needle: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", needle], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in found if int(p) != proc.pid)


@pytest.mark.slow  # 14 s of torchrun; the default run keeps test_ranks_agree_after_every_step
def test_torchrun_training_shares_rank_0s_run_folder(tmp_path):
    """Plain torchrun training through run.py: world size 2, one run folder (rank 0's) shared by
    the ranks, both ranks' RNG states in the checkpoint. (The slow test below also interrupts
    such a run with SIGTERM and resumes it.)"""
    from training import checkpoint as ckpt

    args = ("training.steps=40", "model=mlp", "model.hidden=64", "model.depth=2", *QUIET)
    r = torchrun(str(ROOT / "run.py"), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2" in r.stdout
    runs = [p for p in (tmp_path / "outputs" / "train").iterdir() if (p / "checkpoints").is_dir()]
    assert len(runs) == 1, "all ranks must share rank 0's run folder"
    state = ckpt.load(ckpt.list_checkpoints(runs[0] / "checkpoints")[-1])
    assert state["step"] == 40 and len(state["rng"]) == 2


@pytest.mark.slow
def test_sigterm_to_every_rank_saves_once_and_resume_continues_exactly(tmp_path):
    """What Slurm does at the end of a job: SIGTERM to every process; then resume=true under
    torchrun reaches the parameters of an uninterrupted two-process run. Single-process SIGTERM
    and resume are in the default run (test_reliability); this one costs three torchrun runs."""
    from training import checkpoint as ckpt

    args = (
        "training.steps=400",
        "training.ckpt_every=20",
        "model=mlp",
        "model.hidden=64",
        "model.depth=2",
        *QUIET,
    )
    (tmp_path / "cut").mkdir()
    proc = torchrun(str(ROOT / "run.py"), *args, cwd=tmp_path / "cut", popen=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "cut").glob("outputs/train/*/checkpoints/ckpt_*.pt")):
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint"
            time.sleep(0.1)
        workers = _workers(proc, f"{ROOT / 'run.py'} training.steps=400")
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert out.count("saving a checkpoint at step") == 1  # rank 0 speaks for the run
    (status,) = [
        json.loads(p.read_text()) for p in (tmp_path / "cut").glob("outputs/train/*/train.json")
    ]
    assert status["status"] == "interrupted" and 20 <= status["step"] < 400
    r = torchrun(str(ROOT / "run.py"), *args, "resume=true", cwd=tmp_path / "cut")
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-3000:]
    (tmp_path / "whole").mkdir()
    r = torchrun(str(ROOT / "run.py"), *args, cwd=tmp_path / "whole")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2" in r.stdout
    runs = [
        p
        for p in (tmp_path / "whole" / "outputs" / "train").iterdir()
        if (p / "checkpoints").is_dir()
    ]
    assert len(runs) == 1, "all ranks must share rank 0's run folder"

    def final(root: Path) -> dict:
        runs = sorted(root.glob("outputs/train/*/checkpoints"), key=lambda p: p.stat().st_mtime)
        return ckpt.load(ckpt.list_checkpoints(runs[-1])[-1])

    resumed, whole = final(tmp_path / "cut"), final(tmp_path / "whole")
    assert resumed["step"] == whole["step"] == 400 and len(whole["rng"]) == 2
    for k, v in whole["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=0)


def test_teardown_leaves_a_group_whose_peer_failed_and_destroys_it_otherwise(tmp_path, monkeypatch):
    """Destroying a group whose peer is gone can wait on the peer until the launcher's SIGKILL:
    on a peer failure teardown leaves the group to the process exit; on anything else it
    destroys it."""
    import torch.distributed as dist

    from training.distributed import DistInfo, teardown

    monkeypatch.setenv("WORLD_SIZE", "2")
    info = DistInfo(rank=0, world_size=2)  # what teardown sees; the group itself has one rank
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    for n, (error, kept) in enumerate([(lost, True), (ValueError("a bad config value"), False)]):
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / f'store{n}'}", rank=0, world_size=1
        )
        with pytest.raises(type(error)):
            try:
                raise error
            finally:
                teardown(info)
        assert dist.is_initialized() is kept, error
        if kept:
            dist.destroy_process_group()
