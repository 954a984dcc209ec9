"""Inverse problems from run.py: mode=sample sampler.task=inverse (docs/inverse.md).

Each of the first sampler.n_samples test examples x gives a measurement y = A x + sigma_y e
(e keyed by the seed and the example's index); sampler.inverse_method draws sampler.draws posterior
samples per measurement with the model's score (`samplers.inverse`). For mixture data the draws
are scored against the exact posterior (a Gaussian mixture, closed form), which
`sampler.inverse_method=exact` also draws from: the maximum mean discrepancy between the pairs
(draw, y) and (exact draw, y), beside its fresh-vs-fresh floor. For every data set: the
measurement residual ||A x - y|| (beside the truth's own) and the
error to the truth. Writes samples.npz, a picture (measurement | reconstruction | truth) and
metrics.json.
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

from metrics.quality import mmd
from samplers.inverse import METHODS, posterior_sample
from samplers.operators import MAX_VALUES, OPERATORS, LinearOperator, build_operator
from sde_lib import KeyedNoise
from sde_lib.io import atomic_write, atomic_write_text

from .common import UserError
from .control import _side_by_side, build_mask
from .sample import sample_noise, to_images

log = logging.getLogger(__name__)

MEASUREMENT_STREAM = 0x6D656173
ALL_METHODS = (*METHODS, "exact")


def load_operator(c: dict, dataset, seed: int) -> LinearOperator:
    """sampler.operator for this data set (a name in OPERATORS, or the path of an (m, n) .npy)."""
    spec = str(c["operator"])
    shape = tuple(dataset.shape)
    kw: dict = {"blur_std": float(c["blur_std"]), "factor": int(c["factor"])}
    name = spec
    if spec == "mask":
        kw["known"] = ~build_mask(str(c["mask"]), shape, dataset.kind, seed)
    elif spec not in OPERATORS or spec == "matrix":
        path = Path(spec).expanduser()
        if path.suffix != ".npy" or not path.is_file():
            raise UserError(
                f"sampler.operator={spec} is neither an operator ({', '.join(OPERATORS[:-1])}) "
                "nor an existing .npy file holding an (m, n) matrix"
            )
        try:
            kw["matrix"] = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float64))
        except Exception as e:
            raise UserError(
                f"sampler.operator={spec}: not a readable numeric .npy array ({type(e).__name__})"
            ) from None
        name = "matrix"
    try:
        op = build_operator(name, shape, **kw)
    except ValueError as e:
        raise UserError(f"sampler.operator={spec} does not fit data={dataset.name}: {e}") from None
    if not op.has_svd and str(c["inverse_method"]) != "dps":
        raise UserError(
            f"sampler.inverse_method={c['inverse_method']} needs A's SVD, which "
            f"sampler.operator={spec} on data={dataset.name} ({op.n} values per example; dense "
            f"operators stop at {MAX_VALUES}) does not have; use sampler.inverse_method=dps"
        )
    return op


def method_options(c: dict, method: str, sigma_y: float) -> dict:
    """The keyword options of the method from the sampler group."""
    opts: dict = {"sigma_y": sigma_y, "eps": float(c["eps"])}
    if c.get("inverse_steps") is not None:
        opts["steps"] = int(c["inverse_steps"])
    if method == "dps":
        opts["scale"] = float(c["dps_scale"])
    if method == "tds":
        opts["particles"] = int(c["particles"])
        if not sigma_y > 0:
            raise UserError(
                "sampler.inverse_method=tds needs sampler.sigma_y > 0 (its weights are the "
                "observation density); use sampler.inverse_method=ddrm or replacement for "
                "noiseless measurements"
            )
    return opts


def run_inverse(cfg: dict, sde, dataset, model, ckpt_path, device, out_dir: Path) -> dict:
    c, seed = cfg["sampler"], int(cfg["seed"])
    method, sigma_y, draws = str(c["inverse_method"]), float(c["sigma_y"]), int(c["draws"])
    if method == "exact" and dataset.mixture is None:
        raise UserError(
            f"sampler.inverse_method=exact draws from the closed-form posterior of a mixture "
            f"data set (gmm8, mix5d); data={dataset.name} has none. Use one of "
            f"{', '.join(METHODS)}"
        )
    op = load_operator(c, dataset, seed)
    n = int(c["n_samples"])
    truth = dataset.test_set(n, seed=seed + 1) if dataset.law is not None else dataset.test[:n]
    n = truth.shape[0]
    idx = torch.arange(n)
    e = KeyedNoise.for_indices(seed, idx, MEASUREMENT_STREAM).randn((n, op.m), torch.float64)
    y = (op(truth.double()) + sigma_y * e).float()
    opts = method_options(c, method, sigma_y) if method != "exact" else {}
    rows = idx.repeat_interleave(draws)
    keys = rows * draws + torch.arange(draws).repeat(n)  # one noise stream per draw
    bs = int(c.get("batch_size") or n * draws)
    start = time.perf_counter()
    out, nfe = [], 0
    if method == "exact":
        out = [exact_draws(dataset.mixture, op, y, sigma_y, draws, seed)]
    else:
        for lo in range(0, n * draws, bs):
            sl = slice(lo, lo + bs)
            with torch.no_grad():  # the methods enable autograd for their own x-gradients
                x, nfe = posterior_sample(
                    method, sde, model, op, y[rows[sl]].to(device),
                    generator=sample_noise(seed, keys[sl]), **opts,
                )  # fmt: skip
            out.append(x.detach().cpu())
    x = torch.cat(out).reshape(n * draws, *dataset.shape)
    seconds = time.perf_counter() - start
    resid = (op(x.double()) - y[rows].double()).norm(dim=1)
    metrics = {
        "task": "inverse",
        "method": method,
        "operator": op.name if str(c["operator"]) in OPERATORS else str(c["operator"]),
        "measurements": op.m,
        "sigma_y": sigma_y,
        "n": n,
        "draws": draws,
        "sde": cfg["sde"]["name"],
        "data": dataset.name,
        "checkpoint": str(ckpt_path) if ckpt_path else "exact score",
        **{k: v for k, v in opts.items() if k not in ("sigma_y",)},
        "nfe": nfe,
        "seconds": round(seconds, 3),
        "residual_mean": float(resid.mean()),
        "residual_of_truth": float((op(truth.double()) - y.double()).norm(dim=1).mean()),
        "mse_to_truth": float((x.double() - truth[rows].double()).square().mean()),
    }
    if dataset.mixture is not None:
        metrics.update(posterior_distance(dataset.mixture, op, y[rows], x, sigma_y, draws, seed))
    _save(out_dir, dataset, op, y, x, truth, rows, metrics)
    line = (
        f"inverse ({method}, operator={metrics['operator']}, sigma_y={sigma_y}): {n} "
        f"measurements x {draws} draws in {seconds:.1f} s, NFE {nfe}, residual "
        f"{metrics['residual_mean']:.3g} (the truth's {metrics['residual_of_truth']:.3g})"
    )
    if "posterior_mmd_ratio" in metrics:
        line += f", MMD to the exact posterior {metrics['posterior_mmd_ratio']:.2f} x its floor"
    log.info(line)
    return metrics


def exact_draws(mixture, op: LinearOperator, y, sigma_y: float, draws: int, seed: int):
    """`draws` exact posterior draws per measurement y: (B, m) -> (B draws, D) float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [mixture.posterior(op.matrix, yi, sigma_y).sample(draws, g) for yi in y]
    ).float()


def posterior_distance(mixture, op, y, x, sigma_y: float, draws: int, seed: int) -> dict:
    """MMD between the pairs (x_i, y_i) and (exact posterior draw given y_i, y_i), and its floor:
    the root mean square MMD of 3 fresh exact sets against the same reference."""
    uniq = y[::draws]

    def pairs(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v.flatten(1).double(), y.double()], dim=1)

    ref = pairs(exact_draws(mixture, op, uniq, sigma_y, draws, seed + 101))
    fresh = [
        mmd(pairs(exact_draws(mixture, op, uniq, sigma_y, draws, seed + 202 + i)), ref)
        for i in range(3)
    ]
    floor = math.sqrt(sum(f * f for f in fresh) / 3)
    d = mmd(pairs(x), ref)
    return {"posterior_mmd": d, "posterior_mmd_floor": floor, "posterior_mmd_ratio": d / floor}


def _save(out_dir, dataset, op, y, x, truth, rows, metrics) -> None:
    buf = io.BytesIO()
    extra = {"operator": op.matrix.numpy()} if op.has_svd else {}
    np.savez(
        buf,
        **extra,
        measurements=y.numpy(),
        reconstructions=dataset.inverse_scaler(x).numpy(),
        originals=dataset.inverse_scaler(truth).numpy(),
        measurement_index=rows.numpy(),
    )
    atomic_write(out_dir / "samples.npz", lambda f: f.write(buf.getvalue()))
    picture = out_dir / "inverse.png"
    if dataset.kind == "images":
        k = min(truth.shape[0], 16)
        first = torch.arange(k) * metrics["draws"]  # the first draw of each measurement
        shown = _measurement_image(op, y[:k], truth[:k], dataset)
        trip = torch.stack([shown, x[first].float(), truth[:k].float()], 1).flatten(0, 1)
        _side_by_side(to_images(dataset, trip), k, picture)
    elif dataset.dim == 2:
        _points_plot(x, truth, dataset, picture, metrics)
    else:
        picture = None
    metrics["picture"] = str(picture) if picture else None
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    log.info(f"wrote {out_dir / 'samples.npz'}, {picture}, {out_dir / 'metrics.json'}")


def _measurement_image(op: LinearOperator, y, truth, dataset) -> torch.Tensor:
    """What the measurement shows, as images: y itself when A is square (blur, identity), else
    the least-norm image A⁺ y (a masked image with mid-grey holes, the block image of a
    downsampling, the grey image of a colour one)."""
    if op.m == op.n:
        return y.reshape(truth.shape).float()
    img = op.pinv(y.double(), truth.double()).float()
    if op.name == "mask":
        seen = op.pinv(torch.ones(1, op.m, dtype=torch.float64), truth[:1].double())[0].bool()
        img = torch.where(seen, img, torch.full_like(img, sum(dataset.model_range) / 2))
    return img


def _points_plot(x, truth, dataset, path: Path, metrics: dict) -> None:
    """2-D data: the posterior draws over the data law, and the true points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ref = dataset.test_set(2000, seed=3)
    ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.85", label="data")
    ax.scatter(x[:, 0], x[:, 1], s=4, label=f"posterior draws ({metrics['method']})")
    ax.scatter(truth[:, 0], truth[:, 1], s=12, marker="x", c="k", label="truth")
    ax.set_title(f"operator={metrics['operator']}, sigma_y={metrics['sigma_y']}")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
