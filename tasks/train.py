"""mode=train: build everything from the config, train, write checkpoints and the loss curve."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from sde_lib.io import atomic_write_text
from training import checkpoint as ckpt
from training.conditional import ClassifierLoss, ConditionalLoss
from training.distributed import broadcast_object, share_from_main, teardown
from training.loop import NonFiniteError, TrainSettings, train
from training.losses import make_loss

from .common import (
    UserError,
    build_dataset,
    build_score_model,
    build_sde,
    check_compatible,
    find_checkpoint,
    load_weights,
    matching_runs,
    read_any_checkpoint,
    start_processes,
)
from .conditional import build_classifier
from .logger import RunLogger

log = logging.getLogger(__name__)

RESUME_KEYS = ("optimizer", "scheduler", "rng")


def settings_from(cfg: dict, dataset) -> TrainSettings:
    t, points = cfg["training"], dataset.kind == "points"
    return TrainSettings(
        steps=int(t["steps"] or cfg["data"]["train_steps"]),
        batch_size=int(t["batch_size"] or (256 if points else 128)),
        lr=float(t["lr"] or (2e-3 if points else 1e-3)),
        warmup=int(t["warmup"]),
        grad_clip=float(t["grad_clip"]),
        ema_decay=float(t["ema_decay"]),
        weight_decay=float(t["weight_decay"]),
        seed=int(cfg["seed"]),
        log_every=int(t["log_every"]),
        ckpt_every=int(t["ckpt_every"]),
        keep=int(t["keep"]),
        max_bad_steps=int(t["max_bad_steps"]),
        batch_per_device=None if t["batch_per_device"] is None else int(t["batch_per_device"]),
        random_flip=bool(cfg["data"].get("random_flip", False)),
        workers=int(cfg["data"].get("workers", 0)),
        precision=t["precision"],
        tf32=bool(t["tf32"]),
        compile=bool(t["compile"]),
    )


def _resume_state(cfg: dict):
    """The checkpoint to continue from (resume=true), checked against this run's config."""
    if not cfg.get("resume"):
        return None, None
    if not cfg.get("ckpt"):
        runs = sorted(matching_runs(cfg), key=lambda r: r["mtime"], reverse=True)
        for run in runs:
            found = ckpt.latest_valid(run["dir"] / "checkpoints")
            if found:
                path, state = found
                break
        else:
            raise UserError(
                f"resume=true but no readable checkpoint for sde={cfg['sde']['name']} "
                f"data={cfg['data']['name']} under {Path(cfg['outputs_root']) / 'train'}; "
                "train without resume first"
            )
    else:
        path, state = find_checkpoint(cfg)
    check_compatible(cfg, ckpt.config_of(state), path)
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise UserError(
            f"checkpoint {path} holds weights only (no {', '.join(missing)}); "
            "it can be sampled from but not resumed: train without resume=true"
        )
    log.info(f"resuming from {path} at step {state['step']}")
    return path, state


def init_weights(model: torch.nn.Module, state: dict, path: Path, cfg: dict) -> None:
    """training.init_from: the weights of a checkpoint (`read_any_checkpoint`) into `model`,
    strictly; its EMA weights unless use_ema=false. The optimiser starts afresh."""
    load_weights(model, state, path, cfg)
    step = f" (step {state['step']})" if state.get("step") is not None else ""
    log.info(f"initialised the weights from {path}{step}")


def _write_status(out_dir: Path, summary: dict) -> None:
    atomic_write_text(out_dir / "train.json", json.dumps(summary, indent=2))


def run_train(cfg: dict, out_dir: Path) -> dict:
    info = start_processes(cfg)
    out_dir = Path(broadcast_object(str(out_dir), info))  # one run folder for all ranks
    try:
        dataset = build_dataset(cfg["data"])
        sde = build_sde(cfg["sde"], dataset)
        t = cfg["training"]
        if t["loss"] == "nll" and dataset.kind != "points":
            raise UserError(
                f"training.loss=nll backpropagates through the ODE with the exact divergence, for "
                f"point data; data={dataset.name} holds images: use training.loss=dsm with "
                "training.likelihood_weighting=true"
            )
        classifier = t.get("objective", "score") == "classifier"
        if classifier:  # a noise-conditional classifier p_t(y | x) for classifier guidance
            model = build_classifier(cfg, sde, dataset)
        else:
            model = build_score_model(cfg, sde, dataset)
        conditional = classifier or bool(getattr(model, "n_classes", 0))
        settings = dataclasses.replace(settings_from(cfg, dataset), labels=conditional)
        if settings.batch_size % info.world_size:
            raise UserError(
                f"training.batch_size={settings.batch_size} is not divisible by the "
                f"{info.world_size} processes; use a multiple of {info.world_size}"
            )
        loss = make_loss(
            t["loss"],
            sde,
            eps=float(t["eps"]),
            likelihood_weighting=bool(t["likelihood_weighting"]),
            n_projections=int(t["n_projections"]),
            projection=t["projection"],
            n_levels=int(t["n_levels"]),
            levels=dataset.levels if dataset.kind == "images" else None,
            data_range=dataset.model_range,
            reduce_mean=bool(t.get("reduce_mean", False)),
            noise=t.get("noise", "uniform_t"),
            weighting=t.get("weighting"),
            sigma_data=float(cfg["model"].get("sigma_data") or 0.5),
            p_mean=float(t.get("p_mean", -1.2)),
            p_std=float(t.get("p_std", 1.2)),
            nll_tol=float(t.get("nll_tol", 1e-4)),
            importance_weights=bool(t.get("importance_weights", True)),
        )
        if classifier:
            loss = ClassifierLoss(sde, eps=float(t["eps"]))
        elif conditional:  # the conditional and (label dropout) unconditional score in one net
            loss = ConditionalLoss(loss, float(t.get("label_dropout", 0.0)))
        # rank 0 finds the checkpoint to resume from under its outputs_root (where it wrote
        # it) and every rank receives its contents: the machines need not share a file system
        state = share_from_main(lambda: _resume_state(cfg)[1], info, UserError)
        if state is None and t.get("init_from"):  # fine-tuning: start from released weights
            path = Path(t["init_from"]).expanduser()
            init = share_from_main(lambda: read_any_checkpoint(path), info, UserError)
            init_weights(model, init, path, cfg)
        out_dir = Path(out_dir)
        if info.is_main:
            meta = {k: cfg[k] for k in ("sde", "data", "model", "training", "seed")}
            meta["planned_steps"] = settings.steps
            atomic_write_text(out_dir / "run.json", json.dumps(meta, indent=2))
            _write_status(
                out_dir, {"status": "running", "step": 0, "planned_steps": settings.steps}
            )
            n_params = sum(p.numel() for p in model.parameters())
            log.info(
                f"training {type(model.net).__name__} ({n_params / 1e6:.2f}M params) on "
                f"{dataset.name} with sde={cfg['sde']['name']} loss={t['loss']} for "
                f"{settings.steps} steps (batch {settings.batch_size}, world size "
                f"{info.world_size}, {info.device})"
            )
        logger = RunLogger(cfg["logger"], out_dir, cfg, "train") if info.is_main else None
        try:
            result = train(
                model,
                loss,
                dataset,
                settings,
                out_dir,
                config=cfg,
                dist_info=info,
                resume=state,
                logger=logger,
                progress=bool(cfg.get("progress", True)),
            )
        except NonFiniteError as e:
            if info.is_main:
                _write_status(
                    out_dir, {"status": "failed", "error": str(e), "planned_steps": settings.steps}
                )
            raise UserError(str(e)) from None
        finally:
            if logger is not None:
                logger.finish()
    finally:
        teardown(info)
    summary = {
        "status": result.status,
        "step": result.step,
        "planned_steps": settings.steps,
        "final_loss": result.final_loss,
        "skipped_steps": result.skipped_steps,
        "seconds": round(result.seconds, 2),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
    }
    if info.is_main:
        _write_status(out_dir, summary)
        log.info(
            f"{result.status} at step {result.step}: loss {result.final_loss:.4g}, "
            f"{result.seconds:.1f} s; checkpoint {result.checkpoint}"
        )
    return summary
