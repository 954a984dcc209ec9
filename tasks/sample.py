"""mode=sample: draw samples from a checkpoint or the exact score; write samples, plot, metrics."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import samplers
from metrics.quality import component_weights, mmd, sliced_wasserstein
from training.checkpoint import atomic_write, atomic_write_text

from .common import load_score_model
from .figures import image_grid, scatter_2d
from .logger import RunLogger

# keys of the sampler config group that are not options of the sampler function itself
RUN_KEYS = ("name", "steps", "eps", "denoise", "n_samples", "batch_size")


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


def run_sample(cfg: dict, out_dir: Path, log=print) -> dict:
    c = cfg["sampler"]
    sde, dataset, model, ckpt_path = load_score_model(cfg, log)
    device = next(iter(model.parameters()), torch.empty(0)).device
    n, bs = int(c["n_samples"]), int(c["batch_size"])
    g = torch.Generator(device=device).manual_seed(int(cfg["seed"]))
    options = sampler_call_options(c)
    batches, nfe_per_batch = [], 0
    bar = tqdm(
        total=n,
        desc=f"sample ({c['name']})",
        disable=not cfg.get("progress", True),
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    for i in range(math.ceil(n / bs)):
        size = min(bs, n - i * bs)
        x, nfe = samplers.sample(
            sde,
            model,
            (size, *dataset.shape),
            c["name"],
            c["steps"],
            generator=g,
            device=device,
            eps=float(c["eps"]),
            denoise=bool(c["denoise"]),
            **options,
        )
        batches.append(x.cpu())
        nfe_per_batch = nfe
        bar.update(size)
    seconds = time.perf_counter() - start
    bar.close()
    x = torch.cat(batches)
    if not torch.isfinite(x).all():
        log(f"warning: {int((~torch.isfinite(x)).sum())} non-finite values in the samples")
    metrics = {
        "sampler": c["name"],
        "options": options,
        "steps": c["steps"],
        "eps": c["eps"],
        "denoise": c["denoise"],
        "nfe": nfe_per_batch,
        "n_samples": n,
        "seconds": round(seconds, 4),
        "samples_per_second": n / max(seconds, 1e-9),
        "sde": cfg["sde"]["name"],
        "data": dataset.name,
        "checkpoint": str(ckpt_path) if ckpt_path else "exact score",
    }
    if dataset.mixture is not None:
        metrics.update(quality_metrics(dataset, x, int(cfg["seed"])))

    out_dir = Path(out_dir)
    raw = dataset.inverse_scaler(x)
    buf = io.BytesIO()
    np.savez(buf, samples=raw.numpy(), samples_model_space=x.numpy())
    atomic_write(out_dir / "samples.npz", lambda f: f.write(buf.getvalue()))
    picture = out_dir / "samples.png"
    if dataset.kind == "images":
        image_grid(to_images(dataset, x), picture)
    elif dataset.dim == 2:
        ref = None if dataset.mixture is not None else dataset.test_set(min(n, 2000))
        scatter_2d(
            x,
            picture,
            mixture=dataset.mixture,
            reference=ref,
            title=f"{c['name']} on {dataset.name}, {cfg['sde']['name']}, NFE {nfe_per_batch}",
        )
    else:
        picture = None
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    summary = (
        f"{n} samples with {c['name']} in {seconds:.1f} s ({metrics['samples_per_second']:.0f}"
        f"/s), NFE {nfe_per_batch}"
    )
    if "mmd_to_fresh_data" in metrics:
        summary += (
            f"; MMD to fresh data {metrics['mmd_to_fresh_data']:.4f} (fresh vs fresh "
            f"{metrics['mmd_fresh_vs_fresh']:.4f}), exact loglik "
            f"{metrics['exact_loglik_mean']:.3f} "
            f"(data {metrics['exact_loglik_mean_fresh_data']:.3f})"
        )
    log(summary)
    log(f"wrote {out_dir / 'samples.npz'}, {picture}, {out_dir / 'metrics.json'}")
    logger = RunLogger(cfg["logger"], out_dir, cfg, "sample")
    try:
        logger.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if picture is not None:
            logger.log_image("samples", picture)
    finally:
        logger.finish()
    return metrics
