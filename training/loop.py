"""The training loop: Adam with warm-up and clipping, EMA, checkpoints, rank-aware (torchrun).

Every random draw (batches, times, noise, probes) comes from two generators whose states are saved
in each checkpoint together with the model, EMA, optimiser and schedule, so a resumed run on CPU
reaches exactly the parameters of an uninterrupted one.

Faults: SIGTERM or SIGINT (on any rank) finishes the current step, saves a checkpoint and returns
status "interrupted" (run.py then exits 0); a second signal aborts at once with KeyboardInterrupt
(the atomic save leaves no partial file). A step whose loss or gradient norm is NaN/inf is skipped
(no update of the weights, optimiser or EMA) and counted in `skipped_steps`; `max_bad_steps` of
them in a row save the last good state and raise NonFiniteError. Weights are checked before every
save, so a non-finite checkpoint is never written.
"""

from __future__ import annotations

import io
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import checkpoint as ckpt
from .distributed import DistInfo, all_reduce_mean, barrier
from .ema import EMA


@dataclass
class TrainSettings:
    steps: int = 8000
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 2000
    keep: int = 3
    max_bad_steps: int = 20


@dataclass
class TrainResult:
    step: int
    status: str  # "finished" or "interrupted"
    final_loss: float
    skipped_steps: int
    seconds: float
    checkpoint: Path | None
    history: dict = field(default_factory=dict)


class NonFiniteError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class _StopFlag:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (main thread only).

    A second signal raises KeyboardInterrupt, so a user can still abort a slow save.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second signal {signum} while stopping")
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


CURVE_EVERY_S = 30.0  # the loss curve is redrawn at a checkpoint at most this often, and at the end


def _warmup(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def save_loss_curve(history: dict, path: Path) -> None:
    """Loss against step as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["step"], history["loss"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over log interval)")
    if history["loss"] and min(history["loss"]) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    ckpt.atomic_write(path, lambda f: f.write(buf.getvalue()))


def train(
    model: nn.Module,
    loss_fn,
    dataset,
    settings: TrainSettings,
    out_dir: Path,
    *,
    config: dict,
    dist_info: DistInfo = DistInfo(),
    resume: dict | None = None,
    logger=None,
    progress: bool = True,
    log=print,
) -> TrainResult:
    """Train `model` (a score model) with `loss_fn(score_fn, x0, generator) -> (B,)`.

    Writes checkpoints to out_dir/checkpoints and the loss curve to out_dir/loss.png (rank 0).
    `resume` is a loaded checkpoint state to continue from.
    """
    s, dev, main = settings, dist_info.device, dist_info.is_main
    model.to(dev)
    ema = EMA(model, s.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup(s.warmup))
    data_g = torch.Generator().manual_seed(s.seed * 1000 + dist_info.rank)
    noise_g = torch.Generator(device=dev).manual_seed(s.seed * 1000 + 500 + dist_info.rank)
    step, bad_in_row, skipped = 0, 0, 0
    history: dict = {"step": [], "loss": []}
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        step, skipped = int(resume["step"]), int(resume.get("skipped_steps", 0))
        rng = resume["rng"][dist_info.rank] if dist_info.rank < len(resume["rng"]) else None
        if rng is not None:
            data_g.set_state(rng["data"])
            noise_g.set_state(rng["noise"].to(noise_g.get_state().device))
            torch.set_rng_state(rng["torch"])
        history = {k: list(v) for k, v in resume.get("history", history).items()}
    net = DDP(model) if dist_info.enabled else model
    ckpt_dir = Path(out_dir) / "checkpoints"

    def gather_rng() -> list:
        mine = {
            "data": data_g.get_state(),
            "noise": noise_g.get_state().cpu(),
            "torch": torch.get_rng_state(),
        }
        if not dist_info.enabled:
            return [mine]
        out: list = [None] * dist_info.world_size
        torch.distributed.all_gather_object(out, {k: v.tolist() for k, v in mine.items()})
        return [{k: torch.tensor(v, dtype=torch.uint8) for k, v in o.items()} for o in out]

    curve_drawn = time.perf_counter()

    def save_checkpoint(final: bool = False) -> Path | None:
        nonlocal curve_drawn
        # the weights are the same on every rank, so every rank raises here or none does
        bad = ckpt.non_finite({"model": model.state_dict(), "ema": ema.state_dict()})
        if bad:
            raise NonFiniteError(
                f"non-finite weights ({', '.join(bad[:3])}) at step {step}; not saving them, "
                f"the last good checkpoint is {last_path or 'none'}"
            )
        rng = gather_rng()  # collective: every rank takes part
        path = None
        if main:
            path = ckpt.checkpoint_path(ckpt_dir, step)
            ckpt.save(
                path,
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": step,
                    "skipped_steps": skipped,
                    "rng": rng,
                    "history": history,
                    "config": json.dumps(config),
                },
            )
            ckpt.prune(ckpt_dir, s.keep)
            # a plot costs ~20x a small checkpoint: redraw it at most every CURVE_EVERY_S
            if final or time.perf_counter() - curve_drawn >= CURVE_EVERY_S:
                save_loss_curve(history, Path(out_dir) / "loss.png")
                curve_drawn = time.perf_counter()
        barrier(dist_info)
        return path

    bar = tqdm(
        total=s.steps,
        initial=step,
        disable=not (progress and main),
        desc="train",
        dynamic_ncols=True,
        mininterval=1.0,
    )
    t_start, t_log, step_log = time.perf_counter(), time.perf_counter(), step
    interval_losses: list[float] = []
    last_path, status, last_loss = None, "finished", float("nan")
    model.train()
    with _StopFlag() as stop:
        stop_now = False
        while step < s.steps:
            if stop_now:
                status = "interrupted"
                who = f"signal {stop.signum}" if stop.signum else "a signal on another rank"
                log(f"received {who}: saving a checkpoint at step {step}, stopping")
                break
            x0 = dataset.train_batch(s.batch_size, data_g).to(dev)
            loss = loss_fn(net, x0, noise_g).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            # one collective for the mean loss and "has any rank been asked to stop"
            asked = torch.tensor(float(stop.signum is not None), dtype=loss.dtype, device=dev)
            reduced = all_reduce_mean(torch.stack([loss.detach(), asked]), dist_info)
            loss_all, stop_now = reduced[0], bool(reduced[1] > 0)
            if not (torch.isfinite(loss_all) and torch.isfinite(gnorm)):
                # skip: the weights, optimiser, schedule and EMA stay as they were
                skipped, bad_in_row = skipped + 1, bad_in_row + 1
                opt.zero_grad(set_to_none=True)
                if bad_in_row >= s.max_bad_steps:
                    bar.close()
                    if step > 0:  # the weights are those of the last good step
                        last_path = save_checkpoint(final=True)
                    raise NonFiniteError(
                        f"{bad_in_row} non-finite losses/gradients in a row at step {step}; "
                        f"last good checkpoint: {last_path or 'none'}; lower training.lr, "
                        "check the data, or raise training.max_bad_steps"
                    )
                continue
            bad_in_row = 0
            opt.step()
            sched.step()
            ema.update(model, step)
            step += 1
            last_loss = float(loss_all)
            interval_losses.append(last_loss)
            bar.update(1)
            if step % s.log_every == 0 or step == s.steps:
                now = time.perf_counter()
                mean_loss = sum(interval_losses) / len(interval_losses)
                metrics = {
                    "loss": mean_loss,
                    "lr": sched.get_last_lr()[0],
                    "grad_norm": float(gnorm),
                    "skipped_steps": skipped,
                    "steps_per_s": (step - step_log) / max(now - t_log, 1e-9),
                }
                history["step"].append(step)
                history["loss"].append(mean_loss)
                interval_losses, t_log, step_log = [], now, step
                bar.set_postfix(loss=f"{mean_loss:.4g}")
                if logger is not None and main:
                    logger.log(metrics, step=step)
            if step % s.ckpt_every == 0 and step < s.steps and not stop_now:
                last_path = save_checkpoint()
        last_path = save_checkpoint(final=True)
    bar.close()
    if not math.isfinite(last_loss) and history["loss"]:
        last_loss = history["loss"][-1]
    return TrainResult(
        step, status, last_loss, skipped, time.perf_counter() - t_start, last_path, history
    )
