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

import contextlib
import dataclasses
import io
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from sde_lib.io import atomic_write

from . import checkpoint as ckpt
from .data import BatchPlan
from .distributed import DistInfo, all_reduce_sum, barrier
from .ema import EMA

log = logging.getLogger(__name__)


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
    batch_per_device: int | None = None  # micro-batch size per process (gradient accumulation)
    random_flip: bool = False  # images: horizontal flips, decided per example
    workers: int = 0  # background processes preparing batches (DataLoader)
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights, EMA and loss sums stay fp32)
    tf32: bool = False  # CUDA: TF32 matmuls and convolutions
    compile: bool = False  # torch.compile the network
    labels: bool = False  # batches carry class labels, passed to the loss as labels=


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
    atomic_write(path, lambda f: f.write(buf.getvalue()))


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
    callback=None,
) -> TrainResult:
    """Train `model` (a score model) with `loss_fn(score_fn, x0, noise) -> (B,)`.

    Writes checkpoints to out_dir/checkpoints and the loss curve to out_dir/loss.png (rank 0).
    `resume` is a loaded checkpoint state to continue from; `callback(step, model)`, if given,
    runs on every rank after every optimiser step (tests use it to compare ranks).
    """
    s, dev, main = settings, dist_info.device, dist_info.is_main
    world = dist_info.world_size
    model.to(dev)
    if dataset.train is not None and dev.type != "cpu" and s.workers == 0:
        # an in-memory set lives on the device (with workers it stays on the host, pinned)
        dataset = dataclasses.replace(dataset, train=dataset.train.to(dev))
    if dev.type == "cuda" and s.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ema = EMA(model, s.ema_decay)
    # fused: one kernel per step, and it skips a non-finite step on the device (found_inf)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup(s.warmup))
    plan = BatchPlan(
        dataset,
        s.batch_size,
        s.seed,
        dist_info.rank,
        world,
        s.batch_per_device,
        s.random_flip,
        labels=s.labels,
    )
    step, skipped = 0, 0
    history: dict = {"step": [], "loss": []}
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        step, skipped = int(resume["step"]), int(resume.get("skipped_steps", 0))
        rng = resume["rng"][dist_info.rank] if dist_info.rank < len(resume["rng"]) else None
        if rng is not None and "torch" in rng:  # torch's own generator (dropout)
            torch.set_rng_state(rng["torch"])
        history = {k: list(v) for k, v in resume.get("history", history).items()}
    net = DDP(model) if dist_info.enabled else model
    forward = torch.compile(net) if s.compile else net
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    ckpt_dir = Path(out_dir) / "checkpoints"
    # how often the host reads the device: every step on the CPU (free there), else at log steps
    check_every = 1 if dev.type == "cpu" else s.log_every

    def gather_rng() -> list:
        mine = {"torch": torch.get_rng_state()}
        if not dist_info.enabled:
            return [mine]
        out: list = [None] * world
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
    # device-side tallies, read by the host only every `check_every` / `log_every` steps
    zero = torch.zeros((), device=dev)
    loss_sum, good, bad_in_row, bad_total = zero.clone(), zero.clone(), zero.clone(), zero.clone()
    last_path, status, last_loss, gnorm = None, "finished", float("nan"), zero
    batches = plan.local_batches(step, s.steps, s.workers, pin=dev.type == "cuda")
    model.train()
    with _StopFlag() as stop:
        stop_now = False
        while step < s.steps:
            if stop_now:
                status = "interrupted"
                who = f"signal {stop.signum}" if stop.signum else "a signal on another rank"
                if main:
                    log.info(f"received {who}: saving a checkpoint at step {step}, stopping")
                break
            micro = plan.micro_batches(step, next(batches), dev)
            opt.zero_grad(set_to_none=True)
            local = zero.clone()
            for j, (x0, noise, *labels) in enumerate(micro):
                sync = not dist_info.enabled or j == len(micro) - 1
                with contextlib.nullcontext() if sync else net.no_sync():
                    with autocast:
                        per_example = loss_fn(
                            forward, x0, noise, **({"labels": labels[0]} if labels else {})
                        )
                    part = per_example.float().sum()
                    # DDP averages over ranks: this makes the gradient that of the global mean
                    (part * (world / s.batch_size)).backward()
                local += part.detach()
            gnorm = nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            # one collective for the global loss and "has any rank been asked to stop"
            asked = torch.tensor(float(stop.signum is not None), device=dev)
            reduced = all_reduce_sum(torch.stack([local, asked]), dist_info)
            loss_step = reduced[0] / s.batch_size
            ok = torch.isfinite(loss_step) & torch.isfinite(gnorm)
            # a non-finite step changes nothing: Adam skips it (found_inf), the EMA holds still
            opt.found_inf = (~ok).float()
            opt.step()
            sched.step()
            ema.update(model, step, mask=ok)
            bad_in_row = (bad_in_row + 1) * (~ok)
            bad_total += ~ok
            loss_sum += torch.where(ok, loss_step, zero)
            good += ok
            step += 1
            bar.update(1)
            if callback is not None:
                callback(step, model)
            if step % check_every == 0 or step == s.steps:
                stop_now = bool(reduced[1] > 0) if dist_info.enabled else stop.signum is not None
                row = int(bad_in_row)
                if row >= s.max_bad_steps:
                    skipped += int(bad_total)
                    bar.close()
                    if step > row:  # the weights are those of the last good step
                        last_path = save_checkpoint(final=True)
                    raise NonFiniteError(
                        f"{row} non-finite losses/gradients in a row at step {step}; "
                        f"last good checkpoint: {last_path or 'none'}; lower training.lr, "
                        "check the data, or raise training.max_bad_steps"
                    )
            if step % s.log_every == 0 or step == s.steps:
                now = time.perf_counter()
                n_good = int(good)
                skipped += int(bad_total)
                mean_loss = float(loss_sum) / n_good if n_good else float("nan")
                metrics = {
                    "loss": mean_loss,
                    "lr": sched.get_last_lr()[0],
                    "grad_norm": float(gnorm),
                    "skipped_steps": skipped,
                    "steps_per_s": (step - step_log) / max(now - t_log, 1e-9),
                }
                loss_sum.zero_(), good.zero_(), bad_total.zero_()
                if n_good:
                    history["step"].append(step)
                    history["loss"].append(mean_loss)
                    last_loss = mean_loss
                t_log, step_log = now, step
                bar.set_postfix(loss=f"{mean_loss:.4g}")
                if logger is not None and main:
                    logger.log(metrics, step=step)
            if step % s.ckpt_every == 0 and step < s.steps and not stop_now:
                skipped += int(bad_total)
                bad_total.zero_()
                last_path = save_checkpoint()
        skipped += int(bad_total)
        last_path = save_checkpoint(final=True)
    bar.close()
    if not math.isfinite(last_loss) and history["loss"]:
        last_loss = history["loss"][-1]
    return TrainResult(
        step, status, last_loss, skipped, time.perf_counter() - t_start, last_path, history
    )
