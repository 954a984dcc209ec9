"""Controllable generation from run.py: mode=sample sampler.task=inpaint | colorize (and
inverse, in tasks/inverse.py).

inpaint   fills the region named by sampler.mask (left, right, top, bottom, center, random) or
          given by an .npy array (1 = to fill, 0 = known; shape of one example, or (H, W) for
          images) in the test split's examples. Images use the replacement method with the PC
          sampler (Song et al. 2021, App. I.2; `samplers.inpaint`) and per-example keyed noise;
          low-dimensional points use `samplers.inpaint_resampled` (replacement draws corrected
          to the model's own conditional law), and for mixture data the completions are
          compared with the exact conditional law (a Gaussian mixture, closed form).
colorize  (3-channel data) recovers colour from the grey level by the decoupled method of Song
          et al. 2021, App. I.3: an orthogonal per-pixel transform of RGB whose first coordinate
          is the grey level (R + G + B) / sqrt(3) turns colourisation into imputation of the two
          other coordinates; the score in the new coordinates is the rotated score (the forward
          noise is isotropic, so the SDE is unchanged by the rotation).

Writes samples.npz (inputs, completions, originals, mask: raw values), a side-by-side picture
(rows of input | completion | original) and metrics.json.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

import samplers
from sde_lib import KeyedNoise
from sde_lib.io import atomic_write, atomic_write_text
from training.distributed import teardown

from .common import UserError, load_score_model, start_processes
from .conditional import make_guide, predicted_classes
from .figures import image_grid
from .sample import sample_noise, to_images

log = logging.getLogger(__name__)

MASK_NAMES = ("left", "right", "top", "bottom", "center", "random")
MASK_STREAM = 0x6D61736B
PC_NAMES = {
    "pc": None,
    "em": "euler_maruyama",
    "reverse_diffusion": "reverse_diffusion",
    "ancestral": "ancestral",
}

# orthogonal RGB transform: row 0 is the grey level (R + G + B) / sqrt(3)
COLOR_BASIS = torch.tensor(
    [
        [1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
        [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
        [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)],
    ],
    dtype=torch.float64,
)


def build_mask(spec: str, shape: tuple[int, ...], kind: str, seed: int = 0) -> torch.Tensor:
    """The region to fill, a bool tensor of `shape` (True = unknown, to fill)."""
    if spec in MASK_NAMES:
        if kind == "images":
            _, h, w = shape
            rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
            fill = {
                "left": cols < w // 2 + rows * 0,
                "right": cols >= w - w // 2 + rows * 0,
                "top": rows < h // 2 + cols * 0,
                "bottom": rows >= h - h // 2 + cols * 0,
                "center": (rows >= h // 4)
                & (rows < h - h // 4)
                & (cols >= w // 4)
                & (cols < w - w // 4),
            }.get(spec)
            if fill is None:  # random: one pattern, half of the pixels, keyed by the seed
                fill = _keyed_uniforms(seed, h * w).reshape(h, w) < 0.5
            out = fill.expand(shape).clone()
        else:
            d = math.prod(shape)
            half = max(1, d // 2)
            idx = torch.arange(d)
            if spec in ("top", "bottom", "center"):
                raise UserError(
                    f"sampler.mask={spec} applies to images; for points use left, "
                    "right, random or an .npy file"
                )
            out = {"left": idx < half, "right": idx >= d - half}.get(spec)
            if out is None:
                out = _keyed_uniforms(seed, d) < 0.5
            out = out.reshape(shape)
    else:
        out = _mask_file(spec, shape, kind)
    if bool(out.all()) or not bool(out.any()):
        what = "every value" if bool(out.all()) else "nothing"
        raise UserError(
            f"sampler.mask={spec} marks {what} to fill; give a mask with both known "
            "values and values to fill"
        )
    return out


def _keyed_uniforms(seed: int, n: int) -> torch.Tensor:
    u = KeyedNoise.for_indices(int(seed), torch.zeros(1, dtype=torch.int64), MASK_STREAM)
    v = u.rand((1, n))[0]
    if bool((v < 0.5).all()) or not bool((v < 0.5).any()):  # both kinds present
        v[0] = 1.0 - v[0]
    return v


def _mask_file(spec: str, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    path = Path(spec).expanduser()
    if path.suffix != ".npy" or not path.is_file():
        raise UserError(
            f"sampler.mask={spec} is neither a mask name ({', '.join(MASK_NAMES)}) "
            "nor an existing .npy file"
        )
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(
            f"sampler.mask={spec}: not a readable .npy array ({type(e).__name__})"
        ) from None
    ok = [tuple(shape)] + ([tuple(shape[1:])] if kind == "images" else [])
    if tuple(arr.shape) not in ok:
        raise UserError(
            f"sampler.mask={spec} has shape {tuple(arr.shape)}; the data's examples "
            f"need {' or '.join(str(s) for s in ok)} (1 = to fill, 0 = known)"
        )
    if arr.dtype.kind not in "biuf" or not np.isin(arr, (0, 1)).all():
        raise UserError(f"sampler.mask={spec} must hold only 0 (known) and 1 (to fill)")
    return torch.from_numpy(arr.astype(bool)).expand(shape).clone()


def _pc_options(c: dict) -> dict:
    """The replacement method's PC options from the sampler group (pc, em, reverse_diffusion,
    ancestral)."""
    name = c["name"]
    if name not in PC_NAMES:
        raise UserError(
            f"sampler.task={c['task']} runs the replacement method on the PC "
            f"sampler; use sampler=pc, em, reverse_diffusion or ancestral (got "
            f"sampler={name})"
        )
    opts = {
        "steps": int(c.get("steps") or 1000),
        "eps": float(c["eps"]),
        "denoise": bool(c["denoise"]),
    }
    if name == "pc":
        for k in ("predictor", "corrector", "snr", "n_corrector_steps", "grid"):
            if k in c:
                opts[k] = c[k]
    else:
        opts.update(predictor=PC_NAMES[name], corrector="none")
        if "grid" in c:
            opts["grid"] = c["grid"]
    return opts


def _rotate(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the channels of (B, 3, H, W) images."""
    return torch.einsum("ij,bjhw->bihw", basis.to(x), x)


def colorize(sde, score_fn, images: torch.Tensor, *, generator=None, **pc) -> tuple:
    """Colour images (B, 3, H, W) from their grey level alone (the decoupled method, App. I.3):
    returns (grey inputs as RGB, colourised images, nfe). The grey level of every pixel is kept
    exactly."""
    m = COLOR_BASIS
    known = _rotate(images, m)  # (grey, two colour coordinates)
    keep = torch.zeros(images.shape[1:], dtype=torch.bool, device=images.device)
    keep[0] = True

    def rotated_score(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _rotate(score_fn(_rotate(u, m.T), t), m)

    out, nfe = samplers.inpaint(sde, rotated_score, known, keep, generator=generator, **pc)
    grey = _rotate(torch.where(keep, known, torch.zeros_like(known)), m.T)
    return grey, _rotate(out, m.T), nfe


def run_control(cfg: dict, out_dir: Path, runner=None) -> dict:
    """Load the model in one process and run the task: `runner(cfg, sde, dataset, model,
    ckpt_path, device, out_dir)` if given (tasks.inverse), else inpaint / colorize."""
    c = cfg["sampler"]
    task = c["task"]
    info = start_processes(cfg)
    try:
        if info.world_size > 1:
            raise UserError(f"sampler.task={task} runs in one process; start it without torchrun")
        sde, dataset, model, ckpt_path = load_score_model(cfg)
        model.to(info.device)
        if runner is not None:
            return runner(cfg, sde, dataset, model, ckpt_path, info.device, Path(out_dir))
        return _run(cfg, task, sde, dataset, model, ckpt_path, info.device, Path(out_dir))
    finally:
        teardown(info)


def _run(cfg, task, sde, dataset, model, ckpt_path, device, out_dir) -> dict:
    c, seed = cfg["sampler"], int(cfg["seed"])
    points = dataset.kind == "points"
    if task == "colorize" and (len(dataset.shape) != 3 or dataset.shape[0] != 3):
        raise UserError(
            f"sampler.task=colorize needs 3-channel (RGB) images; data={dataset.name} "
            f"has shape {tuple(dataset.shape)}"
        )
    n = int(c["n_samples"])
    if dataset.law is not None:
        originals = dataset.test_set(n, seed=seed + 1)
    else:
        originals = dataset.test[:n]
        if n > originals.shape[0]:
            log.info(f"the test split holds {originals.shape[0]} examples: completing all of them")
    n = originals.shape[0]
    originals = originals.to(device)
    idx = torch.arange(n)
    guide, guided = make_guide(cfg, model, dataset, sde, device)
    if guide is not None and points:
        raise UserError(
            "sampler.class_label with sampler.task on points is not supported "
            "(inpaint_resampled); use it with image data"
        )
    score = model if guide is None else guide(idx.to(device))
    start = time.perf_counter()
    metrics = {
        "task": task,
        "n": n,
        "sde": cfg["sde"]["name"],
        "data": dataset.name,
        "checkpoint": str(ckpt_path) if ckpt_path else "exact score",
        **guided,
    }
    if task == "colorize":
        pc = _pc_options(c)
        inputs, out, nfe = colorize(sde, score, originals, generator=sample_noise(seed, idx), **pc)
        fill = torch.zeros(dataset.shape, dtype=torch.bool)
        fill[1:] = True  # in the rotated coordinates; reported as the colour coordinates
        grey_err = (out.mean(1) - originals.mean(1)).abs().max().item()
        metrics.update(
            method="decoupled colourisation (Song et al. 2021, App. I.3)",
            grey_level_max_abs_error=grey_err,
            **pc,
        )
        mask_desc = "grey level known, colour filled"
    else:
        fill = build_mask(str(c["mask"]), tuple(dataset.shape), dataset.kind, seed)
        keep = (~fill).to(device)
        if points:
            gen = torch.Generator(device=device).manual_seed(seed)
            with torch.no_grad():
                out, nfe = samplers.inpaint_resampled(
                    sde, score, originals, keep, generator=gen, eps=float(c["eps"])
                )
            metrics["method"] = "inpaint_resampled (replacement + importance resampling)"
        else:
            pc = _pc_options(c)
            out, nfe = samplers.inpaint(
                sde, score, originals, keep, generator=sample_noise(seed, idx), **pc
            )
            metrics.update(method="replacement (Song et al. 2021, App. I.2)", **pc)
        inputs = torch.where(keep, originals, torch.zeros_like(originals))
        known_err = (out - originals)[:, keep].abs().max().item()
        metrics["known_values_max_abs_error"] = known_err
        mask_desc = str(c["mask"])
    seconds = time.perf_counter() - start
    out, inputs, originals = out.cpu(), inputs.cpu(), originals.cpu()
    free = fill.expand(originals.shape[1:])
    metrics.update(
        mask=mask_desc,
        filled_share=float(fill.double().mean()),
        nfe=nfe,
        seconds=round(seconds, 3),
        mse_filled=float((out - originals)[:, free].square().mean()),
    )
    if dataset.mixture is not None and task == "inpaint":
        metrics.update(exact_conditional_check(dataset.mixture, originals, out, ~fill, seed))
    if dataset.labels is not None and dataset.kind == "images":
        pred = predicted_classes(dataset, out, cfg, to_images(dataset, out))
        truth = predicted_classes(dataset, originals, cfg, to_images(dataset, originals))
        metrics["completion_class_agreement"] = float((pred == truth).double().mean())

    buf = io.BytesIO()
    np.savez(
        buf,
        inputs=dataset.inverse_scaler(inputs).numpy(),
        completions=dataset.inverse_scaler(out).numpy(),
        originals=dataset.inverse_scaler(originals).numpy(),
        mask_to_fill=fill.numpy(),
    )
    atomic_write(out_dir / "samples.npz", lambda f: f.write(buf.getvalue()))
    picture = out_dir / f"{task}.png"
    if dataset.kind == "images":
        k = min(n, 16)
        shown = inputs[:k].clone()
        if task == "inpaint":  # the region to fill drawn in mid-grey
            shown[:, free] = sum(dataset.model_range) / 2
        trip = torch.stack([shown, out[:k], originals[:k]], 1).flatten(0, 1)
        _side_by_side(to_images(dataset, trip), k, picture)
    elif dataset.dim == 2:
        _points_picture(inputs, out, originals, fill, picture, dataset)
    else:
        picture = None
    metrics["picture"] = str(picture) if picture else None
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    line = f"{task}: {n} examples in {seconds:.1f} s, NFE {nfe}"
    if "known_values_max_abs_error" in metrics:
        line += f", known values kept (max error {metrics['known_values_max_abs_error']:.1e})"
    if "exact_conditional_loglik_z" in metrics:
        line += f", exact conditional log-lik z = {metrics['exact_conditional_loglik_z']:.2f}"
    log.info(line)
    log.info(f"wrote {out_dir / 'samples.npz'}, {picture}, {out_dir / 'metrics.json'}")
    return metrics


def exact_conditional_check(mixture, originals, out, keep, seed: int) -> dict:
    """Mean exact conditional log-density log p(x_fill | x_known) of the completions against that
    of exact draws from the same conditionals (a Gaussian mixture per row), with the standard
    error of their difference; z near 0 means the completions follow the exact conditional law."""
    g = torch.Generator().manual_seed(seed + 7)
    m = keep.reshape(-1)
    got, ref = [], []
    for x0, xc in zip(originals.double(), out.double()):
        cond = mixture.conditional(x0, m)
        free = xc.reshape(-1)[~m][None]
        got.append(float(cond.log_prob(free)[0]))
        ref.append(float(cond.log_prob(cond.sample(1, generator=g).double().reshape(1, -1))[0]))
    a, b = np.array(got), np.array(ref)
    se = float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
    return {
        "exact_conditional_loglik_mean": float(a.mean()),
        "exact_conditional_loglik_mean_exact_draws": float(b.mean()),
        "exact_conditional_loglik_z": float((a.mean() - b.mean()) / max(se, 1e-12)),
    }


def _side_by_side(u8: np.ndarray, k: int, path: Path) -> None:
    """Rows of (input | completion | original) triples, two triples per row."""
    n, ch, h, w = u8.shape
    per_row = 2 if k > 1 else 1
    rows = math.ceil(k / per_row)
    gap = 2
    width = per_row * (3 * (w + 1) + gap) + 1
    canvas = np.full((rows * (h + 1) + 1, width, ch), 96, dtype=np.uint8)
    for i in range(k):
        r, q = divmod(i, per_row)
        for j in range(3):
            x0 = 1 + q * (3 * (w + 1) + gap) + j * (w + 1)
            canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, x0 : x0 + w] = u8[3 * i + j].transpose(
                1, 2, 0
            )
    image_grid(canvas.transpose(2, 0, 1)[None], path, max_images=1, min_px=256)


def _points_picture(inputs, out, originals, fill, path: Path, dataset) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    ref = dataset.test_set(2000, seed=3)
    for ax, x, title in ((axes[0], out, "completions"), (axes[1], originals, "originals")):
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.85")
        ax.scatter(x[:, 0], x[:, 1], s=4)
        ax.set_title(
            f"{title} (coordinate {int(fill.nonzero()[0][0])} filled)"
            if title == "completions"
            else title
        )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
