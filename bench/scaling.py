"""Benchmark scale-out: processes, devices, precision, and the training loop's own overhead.

    python bench/scaling.py [--quick] [--threads 1]

Rows (each the fastest of `--repeats` runs where it is timed in-process):
  loop overhead   training.loop.train against a minimal hand-written loop (Adam, clipping, EMA,
                  the same DSM loss with torch.randn noise) on the same model and batch:
                  ratio = loop steps/s / hand-written steps/s (goal >= 0.95)
  train 1 vs 2    python run.py (mode=train) with 1 process and with torchrun --nproc_per_node=2
                  at the same global batch: steps/s and examples/s from train.json
  sample 1 vs 2   mode=sample of the exact gmm8 score with sampler=pc (12000 samples by default),
                  wall time of the whole command and samples/s from metrics.json
  nll 1 vs 2      mode=nll of the exact gmm8 score: points/s
  cuda rows       only where CUDA is present: fp32 vs bf16, compile off/on, samples/s, points/s

On a 2-core CPU each of the two processes gets one core (OMP_NUM_THREADS=1), so 2 processes can
at best halve the wall time; the one-process rows use one thread too, for a fair split.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

QUIET = ["logger.mode=disabled", "progress=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_py(args: list[str], root: Path, procs: int) -> float:
    """Run run.py with `procs` processes under outputs_root=root; the command's wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    launcher = [sys.executable]
    if procs > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={procs}",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
        ]
    cmd = [*launcher, str(ROOT / "run.py"), f"outputs_root={root}", *QUIET, *args]
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - start


def newest(root: Path, pattern: str) -> dict:
    path = max(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    return json.loads(path.read_text())


def hand_written_steps_per_s(model, sde, dataset, steps: int, batch: int, device) -> float:
    """The minimal loop a user would write for the same model and DSM loss."""
    from training.ema import EMA

    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    ema = EMA(model, 0.999)
    g = torch.Generator().manual_seed(0)
    model.train()
    start = None
    for k in range(steps + 5):
        if k == 5:
            start = time.perf_counter()
        x0 = dataset.train_batch(batch, g).to(device)
        t = 1e-5 + (1 - 1e-5) * torch.rand(batch, device=device)
        z = torch.randn_like(x0)
        alpha, sigma = sde.alpha_sigma(t)
        shape = (-1, *[1] * (x0.ndim - 1))
        xt = alpha.view(shape) * x0 + sigma.view(shape) * z
        loss = 0.5 * (sigma.view(shape) * model(xt, t) + z).square().flatten(1).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, k)
    return steps / (time.perf_counter() - start)


def loop_steps_per_s(model, sde, dataset, steps: int, batch: int, device, out: Path, **kw):
    """Steady-state steps/s of training.loop.train: the time of `steps` steps is the time of a
    run of 5 + steps steps less that of a run of 5 (same set-up, final checkpoint and plot)."""
    import copy

    from training.distributed import DistInfo
    from training.loop import TrainSettings, train
    from training.losses import make_loss

    seconds = []
    for n in (5, 5 + steps):
        s = TrainSettings(
            steps=n, batch_size=batch, lr=1e-4, warmup=0, log_every=50, ckpt_every=10**9, **kw
        )
        start = time.perf_counter()
        train(
            copy.deepcopy(model),
            make_loss("dsm", sde),
            dataset,
            s,
            out / str(n),
            config={},
            progress=False,
            dist_info=DistInfo(device=torch.device(device)),
        )
        seconds.append(time.perf_counter() - start)
    return steps / (seconds[1] - seconds[0])


def build(data: dict, model: dict, device):
    from tasks.common import build_dataset, build_score_model, build_sde

    cfg = {
        "sde": {"name": "vp", "beta_min": 0.1, "beta_max": 20.0},
        "data": data,
        "model": model,
        "seed": 0,
    }
    sde, ds = build_sde(cfg["sde"]), build_dataset(data)
    return sde, ds, build_score_model(cfg, sde, ds).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and samples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = args.quick
    rows: list[tuple[str, str, str]] = []
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {device}")

    # -- the loop against a minimal hand-written one, same model, batch and loss
    cases = [
        (
            "gmm8 MLP 4x256, batch 256",
            {"name": "gmm8"},
            {"name": "mlp", "hidden": 256, "depth": 4},
            256,
            300 if q else 1000,
        ),
        (
            "digits U-Net ch 32, batch 128",
            {"name": "digits", "levels": 17},
            {"name": "unet", "ch": 32},
            128,
            20 if q else 60,
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for label, data, model_cfg, batch, steps in cases:
            hand, loop = [], []
            for r in range(args.repeats):
                sde, ds, model = build(data, model_cfg, device)
                hand.append(hand_written_steps_per_s(model, sde, ds, steps, batch, device))
                sde, ds, model = build(data, model_cfg, device)
                loop.append(
                    loop_steps_per_s(
                        model, sde, ds, steps, batch, device, Path(tmp) / f"{label}{r}"
                    )
                )
            h, lo = max(hand), max(loop)
            rows.append(
                (
                    f"loop overhead: {label}",
                    f"hand {h:.1f} steps/s, loop {lo:.1f}",
                    f"ratio {lo / h:.3f}",
                )
            )

        # -- processes: run.py with 1 and 2 processes
        train_steps = 300 if q else 1500
        per = {}
        for procs in (1, 2):
            root = Path(tmp) / f"runs{procs}"  # own outputs_root: no nll cache shared
            wall = run_py([f"training.steps={train_steps}", "training.log_every=100"], root, procs)
            t = newest(root, "train/*/train.json")
            per[procs] = (t["step"] / t["seconds"], wall)
            rows.append(
                (
                    f"train gmm8 MLP, {procs} process{'es' if procs > 1 else ''}",
                    f"{per[procs][0]:.0f} steps/s ({per[procs][0] * 256:.0f} examples/s)",
                    f"wall {wall:.1f} s",
                )
            )
        n = 3000 if q else 12000
        for procs in (1, 2):
            root = Path(tmp) / f"runs{procs}"
            wall = run_py(
                [
                    "mode=sample",
                    "model=exact",
                    "sampler=pc",
                    f"sampler.n_samples={n}",
                    "sampler.batch_size=1000",
                ],
                root,
                procs,
            )
            m = newest(root, "sample/*/metrics.json")
            rows.append(
                (
                    f"sample {n} pc (exact gmm8), {procs} process{'es' if procs > 1 else ''}",
                    f"{m['samples_per_second']:.0f} samples/s",
                    f"wall {wall:.1f} s",
                )
            )
        pts = 64 if q else 256
        for procs in (1, 2):
            root = Path(tmp) / f"runs{procs}"
            wall = run_py(
                [
                    "mode=nll",
                    "model=exact",
                    f"likelihood.n_points={pts}",
                    "likelihood.batch_size=16",
                    "likelihood.threads=1",
                ],
                root,
                procs,
            )
            m = newest(root, "nll/*/nll.json")
            label = f"nll {pts} points (exact gmm8), {procs} process{'es' if procs > 1 else ''}"
            rows.append((label, f"{m['n'] / m['seconds']:.1f} points/s", f"wall {wall:.1f} s"))

        if device == "cuda":
            for precision in ("fp32", "bf16"):
                for compiled in (False, True):
                    sde, ds, model = build(
                        {"name": "digits", "levels": 17}, {"name": "unet", "ch": 64}, device
                    )
                    sps = loop_steps_per_s(
                        model,
                        sde,
                        ds,
                        200,
                        128,
                        device,
                        Path(tmp) / f"gpu{precision}{compiled}",
                        precision=precision,
                        compile=compiled,
                    )
                    rows.append(
                        (
                            f"cuda train digits U-Net ch 64, {precision}, compile "
                            f"{'on' if compiled else 'off'}",
                            f"{sps:.1f} steps/s",
                            f"{sps * 128:.0f} images/s",
                        )
                    )

    width = max(len(r[0]) for r in rows)
    print(f"\n{'case':<{width}} | {'throughput':<40} | note")
    print(f"{'-' * width}-|-{'-' * 40}-|-----")
    for a, b, c in rows:
        print(f"{a:<{width}} | {b:<40} | {c}")


if __name__ == "__main__":
    main()
