"""mode=sample: draw samples from a checkpoint or the exact score; write samples, plot, metrics."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import samplers
from likelihood import sample_log_density
from metrics.images import aggregate_seeds, evaluate_images, summary_line
from metrics.quality import component_weights, mmd, sliced_wasserstein
from samplers.api import fit_schedule
from samplers.grids import save_schedule
from samplers.optimise_grid import check_fittable
from samplers.path import ChangedPath
from sde_lib import KeyedNoise
from sde_lib.io import atomic_write, atomic_write_text, file_sha256
from training import checkpoint as ckpt
from training.distributed import (
    DistInfo,
    broadcast_object,
    gather_to_main,
    my_items,
    share_from_main,
    teardown,
)

from .common import (
    UserError,
    build_sde,
    checkpoint_from_main,
    load_score_model,
    start_processes,
)
from .conditional import conditional_metrics, make_guide, sample_labels
from .evaluate import validate_eval
from .figures import image_grid, scatter_2d
from .logger import RunLogger

log = logging.getLogger(__name__)

# keys of the sampler config group that are not options of the sampler function itself
# (the conditional-generation keys are read in tasks/conditional.py, control.py, inverse.py)
RUN_KEYS = (
    "name",
    "steps",
    "eps",
    "denoise",
    "n_samples",
    "batch_size",
    "task",
    "mask",
    "class_label",
    "guidance",
    "classifier",
    "classifier_scale",
    "path",
    "logp",
    "divergence",
    # sampler.task=inverse (tasks/inverse.py)
    "inverse_method",
    "operator",
    "sigma_y",
    "blur_std",
    "factor",
    "inverse_steps",
    "dps_scale",
    "particles",
    "draws",
)


def sampler_call_options(c: dict) -> dict:
    return {k: v for k, v in c.items() if k not in RUN_KEYS}


def quality_metrics(dataset, x: torch.Tensor, seed: int) -> dict:
    """Exact log-likelihood of the samples and two-sample distances to fresh data (mixture laws)."""
    mixture = dataset.mixture
    n = x.shape[0]
    fresh = dataset.test_set(n, seed=seed + 1).to(x)
    fresh2 = dataset.test_set(n, seed=seed + 2).to(x)
    bandwidth = 1.0
    out = {
        "exact_loglik_mean": mixture.log_prob(x.double()).mean().item(),
        "exact_loglik_mean_fresh_data": mixture.log_prob(fresh.double()).mean().item(),
        "two_sample_distance": "MMD, mean of Gaussian kernels with bandwidths 1, 1/2, 1/4, 1/8",
        "mmd_to_fresh_data": mmd(x, fresh, bandwidth=bandwidth),
        "mmd_fresh_vs_fresh": mmd(fresh2, fresh, bandwidth=bandwidth),
        "sliced_w2_to_fresh_data": sliced_wasserstein(x, fresh),
        "sliced_w2_fresh_vs_fresh": sliced_wasserstein(fresh2, fresh),
        "component_weights": component_weights(mixture, x).tolist(),
        "true_weights": mixture.weights.tolist(),
    }
    return out


def to_images(dataset, x: torch.Tensor) -> np.ndarray:
    """Model-space images -> uint8 (N, C, H, W) through the inverse scaler and the data levels."""
    lo, hi = dataset.model_range
    raw = dataset.inverse_scaler(x.clamp(lo, hi))
    r0, r1 = dataset.raw_range
    u = ((raw - r0) / (r1 - r0)).clamp(0, 1)
    return (u * 255).round().to(torch.uint8).cpu().numpy()


def image_metrics(dataset, x: torch.Tensor, extra: dict, cfg: dict, out_dir: Path) -> dict:
    """FID, KID, precision/recall and memorisation (metrics.images) of the sample sets: x for
    eval.seeds entry 0 (when it has eval.n_samples samples), `extra` {entry: batches} for the
    others; the mean and the min over the entries."""

    e = cfg["eval"]
    lo = dataset.model_range[0]
    results = []
    for s in e.get("seeds") or [0]:
        xs = x if s not in extra else torch.cat([extra[s][j] for j in sorted(extra[s])])
        u8 = to_images(dataset, torch.nan_to_num(xs, nan=lo))
        results.append(evaluate_images(dataset, u8, cfg, out_dir, seed=int(s)))
    out = {"eval_seeds": list(e.get("seeds") or [0]), **aggregate_seeds(results)}
    log.info(summary_line(out))
    return out


SAMPLE_STREAM = 0x73616D70  # key word of the sampling noise (training noise has its own)


def sample_noise(seed: int, indices: torch.Tensor) -> KeyedNoise:
    """The noise of the samples with these global indices: each sample has its own stream, keyed
    by (seed, index), so it is the same whatever the batch size or the number of processes."""
    return KeyedNoise.for_indices(seed, indices, SAMPLE_STREAM)


def draw(
    sde, model, dataset, cfg: dict, device, info: DistInfo, n: int, seed: int, guide=None,
    densities: dict | None = None,
):  # fmt: skip
    """This rank's batches of n samples: ({batch index: (b, *D) CPU tensor}, NFE per batch).

    Batch j holds the samples with global indices [j bs, (j + 1) bs); rank r draws the batches
    j = r, r + W, ... of W processes, so the work is split and nothing is drawn twice.
    guide(indices), if given, is the (guided, conditional) score_fn of those samples.
    sampler.logp=true (sampler=ode): each sample's model log-density goes into
    densities[j] ((b,) CPU tensor), and the NFE is the mean per sample.
    """
    c = cfg["sampler"]
    bs = int(c["batch_size"])
    mine = my_items(math.ceil(n / bs), info)
    options = sampler_call_options(c)
    out, nfe = {}, 0
    show = bool(cfg.get("progress", True)) and info.is_main
    with tqdm(total=n, desc=f"sample ({c['name']})", disable=not show, dynamic_ncols=True) as bar:
        for j in mine:
            idx = torch.arange(j * bs, min((j + 1) * bs, n))
            if densities is not None:
                x, densities[j], nfe = _draw_with_density(
                    sde, model if guide is None else guide(idx.to(device)), dataset, c,
                    sample_noise(seed, idx.to(device)), (idx.numel(), *dataset.shape), device,
                )  # fmt: skip
                out[j] = x.cpu()
                bar.update(idx.numel() * info.world_size)
                continue
            try:
                x, nfe = samplers.sample(
                    sde,
                    model if guide is None else guide(idx.to(device)),
                    (idx.numel(), *dataset.shape),
                    c["name"],
                    c["steps"],
                    generator=sample_noise(seed, idx.to(device)),
                    device=device,
                    eps=float(c["eps"]),
                    denoise=bool(c["denoise"]),
                    **options,
                )
            except ValueError as e:  # the samplers check their own options: one line
                raise UserError(f"sampler={c['name']}: {e}") from None
            out[j] = x.cpu()
            bar.update(idx.numel() * info.world_size)
    return out, nfe


def _draw_with_density(sde, score_fn, dataset, c: dict, noise, shape, device):
    """(x_eps, log p_eps(x_eps), mean evaluations per sample) of one batch by the per-point PF
    ODE with the divergence alongside; x_T is the prior draw `samplers.sample` would take."""
    x_T = sde.prior_sampling(tuple(shape), generator=noise, device=device)
    divergence = c.get("divergence", "auto")
    if divergence == "auto":
        divergence = "exact" if dataset.kind == "points" else "hutchinson"
    res = sample_log_density(
        sde, score_fn, x_T, eps=float(c["eps"]), method=c["method"], rtol=float(c["rtol"]),
        atol=float(c["atol"]), divergence=divergence, generator=noise,
    )  # fmt: skip
    return res.x, res.logp.cpu(), float(res.nfe_per_point.double().mean())


def fit_grid(
    cfg: dict, sde, model, dataset, info: DistInfo, out_dir: Path, guided: bool
) -> tuple[dict, Path]:
    """sampler.grid=fit: the time steps fitted once (rank 0) to this model's own flow and written
    to out_dir/schedule.json; returns (cfg with sampler.grid set to those times, the file). The
    times reach the other ranks through the process group, not the file (rank 0's run folder may
    be on another machine)."""
    c = cfg["sampler"]
    if guided:
        raise UserError(
            "sampler.grid=fit fits an unguided model's flow; drop class_label / "
            "guidance, or fit without them and pass the file as sampler.grid"
        )
    path = out_dir / "schedule.json"

    def fit_on_main() -> list[float]:
        start = time.perf_counter()
        try:
            times, fit = fit_schedule(
                sde,
                model,
                tuple(dataset.shape),
                c["name"],
                int(c["steps"]),
                eps=float(c["eps"]),
                denoise=bool(c["denoise"]),
                options=sampler_call_options(c),
                device=info.device,
            )
        except ValueError as e:
            raise UserError(f"sampler.grid=fit: {e}") from None
        save_schedule(
            path,
            times,
            sde=repr(sde),
            solver=c["name"],
            eps=float(c["eps"]),
            denoise=bool(c["denoise"]),
            checkpoint=cfg.get("ckpt"),
            fit=fit,
        )
        fixed = ", ".join(
            f"{k} {v:.3g}"
            for k, v in fit["mse_start"].items()
            if k in samplers.GRIDS and math.isfinite(v)
        )
        log.info(
            f"fitted a {c['steps']}-step schedule for sampler={c['name']} to this model's flow "
            f"in {time.perf_counter() - start:.0f} s (squared error to its reference flow "
            f"{fit['mse']:.3g}; fixed grids: {fixed}); reuse it with sampler.grid={path}"
        )
        # the float64 times as the file holds them: every rank samples on exactly the grid that
        # sampler.grid=<the file> gives later (get_grid checks a list and a file the same way)
        return torch.as_tensor(times, dtype=torch.float64).tolist()

    times = share_from_main(fit_on_main, info, UserError)
    return {**cfg, "sampler": {**c, "grid": times}}, path


def auto_grid(cfg: dict, sde, model, dataset, info: DistInfo, ckpt_path, guided: bool) -> dict:
    """sampler.grid=auto: the schedule fitted to this checkpoint's flow for this sampler and
    steps, or the sampler's own default grid where that is closer to the flow on the calibration
    batch. Fitted once per (checkpoint content, sampler, options, steps, eps, denoise) and cached
    in outputs_root/schedules/; the shipped default where no fit can run (the exact score, a
    guided or stochastic sampler). Returns cfg with sampler.grid set (None = the default)."""
    c = cfg["sampler"]
    options = {k: v for k, v in sampler_call_options(c).items() if k != "grid"}
    why = None
    if ckpt_path is None:
        why = "the exact score has no checkpoint to fit to"
    elif guided:
        why = "a guided score is not fitted"
    else:
        try:
            check_fittable(c["name"], options, c.get("steps"))
        except ValueError as e:
            why = str(e)
    if why is not None:
        log.info(f"sampler.grid=auto: the sampler's own default grid ({why})")
        return {**cfg, "sampler": {**c, "grid": None}}
    key = {
        "checkpoint_sha256": file_sha256(Path(ckpt_path)),
        "sde": repr(sde),
        "sampler": c["name"],
        "options": options,
        "steps": int(c["steps"]),
        "eps": float(c["eps"]),
        "denoise": bool(c["denoise"]),
        "use_ema": bool(cfg.get("use_ema", True)),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cfg["outputs_root"]) / "schedules" / f"{c['name']}_{c['steps']}_{digest}.json"

    def fit_on_main():
        if path.is_file():
            saved = json.loads(path.read_text())
            log.info(f"sampler.grid=auto: reusing {path} ({saved['auto']['choice']})")
            return saved["times"] if saved["auto"]["choice"] == "fitted" else None
        start = time.perf_counter()
        times, fit = fit_schedule(
            sde, model, tuple(dataset.shape), c["name"], int(c["steps"]), eps=float(c["eps"]),
            denoise=bool(c["denoise"]), options=options, device=info.device, compare_default=True,
        )  # fmt: skip
        default = fit["mse_compare"]["default"]
        choice = "fitted" if fit["mse"] < default else "default"
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        save_schedule(
            path, times, **key, fit=fit,
            auto={"choice": choice, "mse_fitted": fit["mse"], "mse_default": default,
                  "fit_seconds": seconds},
        )  # fmt: skip
        log.info(
            f"sampler.grid=auto: fitted in {seconds:.0f} s; squared error to "
            f"the model's flow {fit['mse']:.3g} fitted, {default:.3g} on the default grid: using "
            f"the {choice} one (cached in {path})"
        )
        return torch.as_tensor(times, dtype=torch.float64).tolist() if choice == "fitted" else None

    times = share_from_main(fit_on_main, info, UserError)
    return {**cfg, "sampler": {**c, "grid": times}}


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the samples with no NaN or inf value."""
    return torch.isfinite(x.flatten(1)).all(1)


def _model_state(ckpt_path: Path | None) -> str:
    """The checkpoint and the state of the training run that wrote it, for an error line."""
    if ckpt_path is None:
        return "the exact score"
    run_dir = Path(ckpt_path).parent.parent
    try:
        status = json.loads((run_dir / "train.json").read_text()).get("status", "unknown")
    except (OSError, ValueError, AttributeError):
        status = "unknown"
    try:
        planned = json.loads((run_dir / "run.json").read_text()).get("planned_steps")
    except (OSError, ValueError, AttributeError):
        planned = None
    step = ckpt.step_of(ckpt_path)
    of = f" of {planned} planned" if planned else ""
    return f"checkpoint {ckpt_path} (step {step}{of}, training run {status})"


def run_sample(cfg: dict, out_dir: Path) -> dict:
    c = cfg["sampler"]
    info = start_processes(cfg)
    # rank 0's run folder is the run's: the others write nothing there (it may be on another
    # machine) and only name it
    out_dir = Path(broadcast_object(str(out_dir), info))
    try:
        sde, dataset, model, ckpt_path = load_score_model(cfg, checkpoint_from_main(info))
        if dataset.kind == "images" and cfg.get("eval"):
            validate_eval(cfg)
        model.to(info.device)
        if c.get("path"):  # the model's scores used on another probability path
            target = build_sde({"name": c["path"]})
            log.info(f"sampling on sde={c['path']} with a model of sde={cfg['sde']['name']}")
            sde, model = target, ChangedPath(model, sde, target)
        guide, guided = make_guide(cfg, model, dataset, sde, info.device)
        grid_file = None  # sampler.grid=fit: the schedule file it writes (rank 0)
        if c.get("grid") == "fit":
            cfg, grid_file = fit_grid(cfg, sde, model, dataset, info, out_dir, guide is not None)
            c = cfg["sampler"]
        elif c.get("grid") == "auto":
            cfg = auto_grid(cfg, sde, model, dataset, info, ckpt_path, guide is not None)
            c = cfg["sampler"]
        start = time.perf_counter()
        n, seed = int(c["n_samples"]), int(cfg["seed"])
        densities = {} if c.get("logp") else None
        mine, nfe = draw(sde, model, dataset, cfg, info.device, info, n, seed, guide, densities)
        batches = gather_to_main(mine, info)
        if densities is not None:
            densities = gather_to_main(densities, info)
        seconds = time.perf_counter() - start
        # image data: FID & co. on one sample set per eval.seeds entry (seed + entry), the
        # first of them the set above when it has eval.n_samples samples
        extra = {}
        if dataset.kind == "images" and cfg.get("eval"):
            e = cfg["eval"]
            n_eval = int(e.get("n_samples") or n)
            for k, s in enumerate(e.get("seeds") or [0]):
                if k == 0 and s == 0 and n_eval == n:
                    continue
                part, _ = draw(sde, model, dataset, cfg, info.device, info, n_eval, seed + s, guide)
                extra[s] = gather_to_main(part, info)
    finally:
        teardown(info)
    if not info.is_main:
        return {}
    x = torch.cat([batches[j] for j in sorted(batches)])
    n = x.shape[0]
    ok = finite_rows(x)
    bad = int((~ok).sum())
    if bad == n:
        raise UserError(
            f"all {n} samples hold NaN or inf values: {_model_state(ckpt_path)}; "
            "nothing was written: train further or from a lower training.lr, "
            "or pass another ckpt"
        )
    if bad:
        log.warning(
            f"{bad} of {n} samples hold NaN or inf values; the metrics and pictures "
            "use the finite ones (a diverged model or sampler: check the training run)"
        )
    metrics = {
        "sampler": c["name"],
        # a fitted schedule is named by its file (the times are in it)
        "options": {**sampler_call_options(c), **({"grid": str(grid_file)} if grid_file else {})},
        "steps": c["steps"],
        "eps": c["eps"],
        "denoise": c["denoise"],
        "nfe": nfe,
        "n_samples": n,
        "non_finite_samples": bad,
        "seconds": round(seconds, 4),
        "samples_per_second": n / max(seconds, 1e-9),
        "world_size": info.world_size,
        "device": info.device.type,
        "sde": cfg["sde"]["name"],
        "data": dataset.name,
        "checkpoint": str(ckpt_path) if ckpt_path else "exact score",
        **guided,
    }
    labels = sample_labels(cfg, n, guided["n_classes"]) if guided else None
    good = x[ok]
    if dataset.mixture is not None and good.shape[0] > 1:
        metrics.update(quality_metrics(dataset, good, int(cfg["seed"])))
    if dataset.kind == "images" and cfg.get("eval"):
        metrics.update(image_metrics(dataset, x, extra, cfg, out_dir))
    if good.shape[0] > 0:
        u8 = to_images(dataset, good) if dataset.kind == "images" else None
        metrics.update(
            conditional_metrics(dataset, good, None if labels is None else labels[ok], cfg, u8)
        )
        if "conditional_accuracy" in metrics:
            log.info(
                f"share of samples of the requested class ({metrics['conditional_judge']}): "
                f"{metrics['conditional_accuracy_mean']:.3f}; per class "
                f"{ {k: round(v, 3) for k, v in metrics['conditional_accuracy'].items()} }"
            )

    raw = dataset.inverse_scaler(x)
    buf = io.BytesIO()
    extra_arrays = {} if labels is None else {"labels": labels.numpy()}
    if densities is not None:  # the model's log-density of each sample, in model space
        extra_arrays["logp_model_space"] = torch.cat(
            [densities[j] for j in sorted(densities)]
        ).numpy()
    np.savez(buf, samples=raw.numpy(), samples_model_space=x.numpy(), **extra_arrays)
    atomic_write(out_dir / "samples.npz", lambda f: f.write(buf.getvalue()))
    picture = out_dir / "samples.png"
    if dataset.kind == "images":
        lo = dataset.model_range[0]
        image_grid(to_images(dataset, torch.nan_to_num(x, nan=lo)), picture)
    elif dataset.dim == 2 and good.shape[0] > 0:
        ref = None if dataset.mixture is not None else dataset.test_set(min(n, 2000))
        scatter_2d(
            good,
            picture,
            mixture=dataset.mixture,
            reference=ref,
            title=f"{c['name']} on {dataset.name}, {cfg['sde']['name']}, NFE {nfe}",
        )
    else:
        picture = None
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    summary = (
        f"{n} samples with {c['name']} in {seconds:.1f} s ({metrics['samples_per_second']:.0f}"
        f"/s, {info.world_size} process{'es' if info.world_size > 1 else ''}), NFE {nfe}"
    )
    if "mmd_to_fresh_data" in metrics:
        summary += (
            f"; MMD to fresh data {metrics['mmd_to_fresh_data']:.4f} (fresh vs fresh "
            f"{metrics['mmd_fresh_vs_fresh']:.4f}), exact loglik "
            f"{metrics['exact_loglik_mean']:.3f} "
            f"(data {metrics['exact_loglik_mean_fresh_data']:.3f})"
        )
    log.info(summary)
    written = [out_dir / "samples.npz", picture, out_dir / "metrics.json"]
    log.info(f"wrote {', '.join(str(w) for w in written if w is not None)}")
    logger = RunLogger(cfg["logger"], out_dir, cfg, "sample")
    try:
        logger.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if picture is not None:
            logger.log_image("samples", picture)
    finally:
        logger.finish()
    return metrics
