"""mode=nll: per-point negative log-likelihood of the test split, in nats and bits/dim.

The test split (its first `likelihood.n_points`) is evaluated in batches of `likelihood.batch_size`:
log p(x) through the probability-flow ODE (`likelihood.method=ode`) or the variational bound of
the reverse SDE (`method=elbo`, an upper bound on -log p), or the variational bound of the
diffusion model on the data themselves (`method=vlb`: VDM's continuous-time bound, or with
`likelihood.steps=N` DDPM's N-step one, both with the discretised decoder on discrete data, so
no dequantisation; `likelihood.vlb`). Image data with discrete levels are dequantised
(`likelihood.dequantization`: uniform or truncated normal, each estimate the importance-weighted
bound over `importance_samples` draws, `dequant_draws` estimates averaged per image;
`likelihood.dequantization`) and also reported in bits/dim;
data with a known density (gmm8, mix5d) are compared with the exact -log p_0 of the same points.

Each finished batch is written to <outputs_root>/nll_cache/<key>/ as JSON, where the key hashes
everything that determines the numbers (checkpoint content, weights, SDE, data, model, seed,
device type, dtype and the likelihood settings that matter for the method), and the file name
carries a hash of the batch's own points. A later run with the same key reuses finished batches,
so an interrupted evaluation resumes where it stopped. Random draws (Hutchinson probes,
dequantisation, VLB samples) are keyed by (seed, the point's index in the test split), and the
default ODE solver (`likelihood.backend=perpoint`) controls each point's steps on its own, so a
point's value is the same in any batch, batch size or number of processes (the ELBO's draws come
from a generator seeded by (seed, batch index)); a reused batch holds exactly what recomputing it
would give.

Outputs: <out_dir>/nll.json and one summary line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data.datasets import Dataset
from likelihood import bits_per_dim, elbo, log_likelihood_stats
from likelihood.dequantization import draw_dequantization
from likelihood.ode import PERPOINT_METHODS, SCIPY_METHODS, SCIPY_OWN, TORCHDIFFEQ_METHODS
from likelihood.vlb import vlb
from sde_lib import SDE, KeyedNoise
from sde_lib.io import atomic_write_text, file_sha256
from training.distributed import (
    broadcast_object,
    gather_to_main,
    my_items,
    share_from_main,
    teardown,
)

from .common import (
    UserError,
    checkpoint_from_main,
    data_identity,
    load_score_model,
    start_processes,
)
from .logger import RunLogger

log = logging.getLogger(__name__)

METHODS = ("ode", "elbo", "vlb")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Solvers per backend: the per-point pairs; torchdiffeq's adaptive ones; for scipy its own names
# and the torchdiffeq names of the same Runge-Kutta pairs (dopri5 = RK45, bosh3 = RK23, dopri8 =
# DOP853).
SOLVERS = {
    "perpoint": PERPOINT_METHODS,
    "torchdiffeq": TORCHDIFFEQ_METHODS,
    "scipy": (*SCIPY_METHODS, *SCIPY_OWN),
}
# Likelihood settings that change the numbers, per method (n_points and batch_size do not enter
# the key: each batch file is named by a hash of its own points).
KEY_FIELDS = {
    "ode": (
        "divergence",
        "probe",
        "n_probes",
        "solver",
        "rtol",
        "atol",
        "eps",
        "backend",
        "dequantization",
        "importance_samples",
    ),
    "elbo": ("elbo_samples", "eps"),
    "vlb": ("vlb_samples", "steps", "vlb_time", "eps"),
}
# Bump when the meaning of a cached batch changes, so that old caches are not reused.
CACHE_VERSION = 2  # 2: per-point keyed draws and per-point evaluation counts
# Rows of one score call in the ELBO: about 2^20 numbers per activation channel.
ELBO_NUMBERS_PER_CALL = 2**20


# --------------------------------------------------------------------------- one batch


@dataclass(frozen=True)
class BatchResult:
    """Per-point log p(x) in nats (dequantisation draws averaged), each point's evaluations of
    the score (its own solves', over its dequantisation draws), the Monte Carlo standard error per
    point (Hutchinson probes or ELBO samples; None
    when there is none to estimate), and the seconds it took to compute."""

    logp: list[float]
    nfe: list[int]
    mc_stderr: list[float] | None
    seconds: float

    def to_json(self) -> dict:
        return {
            "logp": self.logp,
            "nfe": self.nfe,
            "mc_stderr": self.mc_stderr,
            "seconds": self.seconds,
        }

    @staticmethod
    def from_json(d: dict, n: int) -> BatchResult:
        result = BatchResult(
            [float(v) for v in d["logp"]],
            [int(v) for v in d["nfe"]],
            None if d["mc_stderr"] is None else [float(v) for v in d["mc_stderr"]],
            float(d["seconds"]),
        )
        bad_se = result.mc_stderr is not None and len(result.mc_stderr) != n
        if len(result.logp) != n or len(result.nfe) != n or bad_se:
            raise ValueError(f"holds {len(result.logp)} points, expected {n}")
        return result


def _log_prob(
    sde: SDE, score_fn, x: torch.Tensor, lc: dict, generator, dataset=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log p(x): (B,), evaluations per point: (B,), Monte Carlo stderr: (B,) or None) by the
    configured method."""
    if lc["method"] == "vlb":
        rows = max(1, min(65536, ELBO_NUMBERS_PER_CALL // x[0].numel()))
        images = dataset is not None and dataset.kind == "images" and dataset.levels is not None
        res = vlb(
            sde,
            score_fn,
            x,
            levels=dataset.levels if images else None,
            data_range=dataset.model_range if images else (-1.0, 1.0),
            n_samples=int(lc["vlb_samples"]),
            steps=None if lc.get("steps") is None else int(lc["steps"]),
            eps=float(lc["eps"]),
            time_sampling=lc.get("vlb_time", "auto"),
            max_batch=rows,
            generator=generator,
        )
        per_point = torch.full((x.shape[0],), int(lc["vlb_samples"]), dtype=torch.long)
        return -res.bound.to(x.dtype), per_point, res.stderr.to(x.dtype)
    if lc["method"] == "elbo":
        rows = max(1, min(65536, ELBO_NUMBERS_PER_CALL // x[0].numel()))
        bound, se = elbo(
            sde,
            score_fn,
            x,
            n_samples=int(lc["elbo_samples"]),
            eps=float(lc["eps"]),
            max_batch=rows,
            generator=generator,
        )
        return -bound, torch.full((x.shape[0],), int(lc["elbo_samples"]), dtype=torch.long), se
    res = log_likelihood_stats(
        sde,
        score_fn,
        x,
        divergence=lc["divergence"],
        probe=lc["probe"],
        n_probes=int(lc["n_probes"]),
        method=lc["solver"],
        rtol=float(lc["rtol"]),
        atol=float(lc["atol"]),
        eps=float(lc["eps"]),
        backend=lc["backend"],
        generator=generator,
    )
    stderr = res.stderr if lc["divergence"] == "hutchinson" else None
    return res.logp, res.nfe_per_point.cpu(), stderr


def check_dequantization(lc: dict, dataset: Dataset) -> None:
    """Dequantisation options need discrete image data evaluated through the ODE."""
    plain = lc.get("dequantization", "uniform") == "uniform"
    plain = plain and int(lc.get("importance_samples", 1)) == 1
    if plain:
        return
    if dataset.kind != "images" or dataset.levels is None:
        raise UserError(
            f"likelihood.dequantization / importance_samples bound log P of discrete data; "
            f"data={dataset.name} is continuous: leave them at uniform / 1"
        )
    if lc["method"] != "ode":
        raise UserError(
            f"likelihood.dequantization / importance_samples apply to method=ode; "
            f"method={lc['method']} bounds the discrete data by its own decoder"
        )


def evaluate_batch(
    sde: SDE,
    score_fn,
    x: torch.Tensor,
    dataset: Dataset,
    lc: dict,
    generator,
) -> BatchResult:
    """log p of a batch x: (B, *D) in model space. Images with levels are dequantised
    (`likelihood.dequantization`, lo, hi = the model range): each of `dequant_draws` estimates is
    the bound on log P(k) of `importance_samples` draws (likelihood.dequantization), returned as
    the equivalent density log P(k) - D log delta (delta = (hi - lo) / L, the cell width), so
    that bits/dim = -(that + D log delta) / (D ln 2) is the bound's; the estimates are
    averaged."""
    start = time.perf_counter()
    if dataset.kind != "images" or dataset.levels is None or lc["method"] == "vlb":
        logp, nfe, se = _log_prob(sde, score_fn, x, lc, generator, dataset)
        nfes, ses = nfe, None if se is None else se.square()
    else:
        k = dataset.raw_levels(x)
        lo, hi = dataset.model_range
        kind = lc.get("dequantization", "uniform")
        n_is = int(lc.get("importance_samples", 1))
        eps = torch.tensor([float(lc["eps"])], dtype=torch.float64)
        alpha, sigma = (float(v.detach()) for v in sde.alpha_sigma(eps))
        log_cell = k[0].numel() * math.log((hi - lo) / dataset.levels)
        draws, nfes, ses = [], 0, []
        for _ in range(int(lc["dequant_draws"])):
            weights = []
            for _ in range(n_is):
                xd, log_q = draw_dequantization(
                    k, levels=dataset.levels, lo=lo, hi=hi, kind=kind, std=sigma / alpha,
                    centre=x.double(), generator=generator,
                )  # fmt: skip
                logp_d, nfe, se = _log_prob(sde, score_fn, xd.to(x.dtype), lc, generator)
                weights.append(logp_d.double() - log_q.to(logp_d.device))
                nfes = nfes + nfe
                # Hutchinson's spread is reported for the plain bound only (inside a
                # log-mean-exp the probe noise no longer averages out)
                ses = None if se is None or ses is None or n_is > 1 else [*ses, se.square()]
            bound = torch.logsumexp(torch.stack(weights), 0) - math.log(n_is)
            draws.append(bound - log_cell)
        logp = torch.stack(draws).mean(0)
        ses = None if ses is None else torch.stack(ses).sum(0) / len(draws) ** 2
    return BatchResult(
        logp.double().cpu().tolist(),
        nfes.tolist(),
        None if ses is None else ses.sqrt().double().cpu().tolist(),
        time.perf_counter() - start,
    )


# --------------------------------------------------------------------------- cache


def _sha256_tensor(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def cache_material(
    cfg: dict, ckpt_path: Path | None, device: torch.device, checkpoint_sha256: str | None = None
) -> dict:
    """Everything besides the points themselves that determines a batch's numbers.
    checkpoint_sha256: the checkpoint file's hash, given where this process cannot read the
    file (under torchrun rank 0 hashes it for all); hashed here when not given."""
    lc = cfg["likelihood"]
    if checkpoint_sha256 is None and ckpt_path is not None:
        checkpoint_sha256 = file_sha256(ckpt_path)
    return {
        "version": CACHE_VERSION,
        "checkpoint_sha256": checkpoint_sha256,
        "use_ema": bool(cfg.get("use_ema", True)) if ckpt_path is not None else None,
        "sde": cfg["sde"],
        "data": data_identity(cfg["data"]),
        "model": cfg["model"] if ckpt_path is None else None,  # the checkpoint holds its own
        "seed": int(cfg["seed"]),
        "device": device.type,
        "dtype": lc["dtype"],
        "method": lc["method"],
        "dequant_draws": int(lc["dequant_draws"]),
        **{k: lc.get(k) for k in KEY_FIELDS[lc["method"]]},
    }


def cache_key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def batch_seed(seed: int, index: int) -> int:
    """A 63-bit seed for batch `index` of a run with `seed`."""
    digest = hashlib.sha256(f"nll:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _read_cached(path: Path, n: int) -> BatchResult | None:
    if not path.is_file():
        return None
    try:
        return BatchResult.from_json(json.loads(path.read_text()), n)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning(f"cached batch {path} is unreadable ({e}); computing it again")
        return None


# --------------------------------------------------------------------------- the mode


def _test_points(dataset: Dataset, n_points: int | None) -> torch.Tensor:
    x = dataset.test_set(n_points)
    if n_points is not None and x.shape[0] < n_points:
        log.info(
            f"likelihood.n_points={n_points} but the {dataset.name} test split has "
            f"{x.shape[0]} points; evaluating all {x.shape[0]}"
        )
    return x


def _mean_stderr(values: torch.Tensor) -> float | None:
    """Standard error of the mean of `values` (None for fewer than two)."""
    n = values.numel()
    return float(values.std() / math.sqrt(n)) if n > 1 else None


def _pm(value: float | None) -> str:
    return "± n/a" if value is None else f"± {value:.2g}"


def summarise(
    cfg: dict,
    dataset: Dataset,
    x: torch.Tensor,
    results: list[BatchResult],
    ckpt_path: Path | None,
) -> dict:
    """The figures of nll.json from the per-batch results (x: all evaluated points)."""
    lc = cfg["likelihood"]
    vlb_method = lc["method"] == "vlb"
    elbo_method = lc["method"] == "elbo" or vlb_method  # Monte Carlo bounds, no ODE solver
    probes = not elbo_method and lc["divergence"] == "hutchinson"
    nll = -torch.tensor([v for r in results for v in r.logp], dtype=torch.float64)
    n, dim = nll.numel(), dataset.dim
    mc = [r.mc_stderr for r in results]
    mc_stderr = None
    if all(m is not None for m in mc):  # stderr of the mean due to probes / ELBO samples alone
        se = torch.tensor([v for m in mc for v in m], dtype=torch.float64)
        mc_stderr = float(se.square().sum().sqrt() / n)
    nfe = [v for r in results for v in r.nfe]
    out = {
        "nll_nats": float(nll.mean()),
        "stderr": _mean_stderr(nll),
        "bpd": None,
        "bpd_stderr": None,
        "hutchinson_stderr": None if elbo_method else mc_stderr,
        "elbo_stderr": mc_stderr if lc["method"] == "elbo" else None,
        "vlb_stderr": mc_stderr if vlb_method else None,
        "bound": _bound_name(lc, dataset),
        "exact_nll_nats": None,
        "gap": None,
        "gap_stderr": None,
        "n": n,
        "dim": dim,
        "nfe_mean": sum(nfe) / len(nfe),  # per point (its own solves' evaluations)
        "nfe_max": max(nfe),
        "compute_seconds": sum(r.seconds for r in results),
        "method": lc["method"],
        "eps": lc["eps"],
        **{k: None if elbo_method else lc[k] for k in ("solver", "rtol", "atol")},
        **{k: None if elbo_method else lc[k] for k in ("divergence", "backend")},
        "n_probes": lc["n_probes"] if probes else None,
        "elbo_samples": lc["elbo_samples"] if lc["method"] == "elbo" else None,
        "vlb_samples": lc["vlb_samples"] if vlb_method else None,
        "vlb_steps": lc.get("steps") if vlb_method else None,
        "dtype": lc["dtype"],
        "checkpoint": None if ckpt_path is None else str(ckpt_path),
        "use_ema": bool(cfg.get("use_ema", True)) if ckpt_path is not None else None,
        "model": cfg["model"]["name"],
        "sde": cfg["sde"]["name"],
        "data": dataset.name,
        "levels": dataset.levels if dataset.kind == "images" else None,
        "dequant_draws": None,
    }
    if dataset.kind == "images" and dataset.levels is not None and vlb_method:
        # a bound on -log P(x) of the discrete data itself: bits/dim with no dequantisation
        out.update(
            bpd=float(nll.mean() / (dim * math.log(2))),
            bpd_stderr=None if out["stderr"] is None else out["stderr"] / (dim * math.log(2)),
        )
    elif dataset.kind == "images" and dataset.levels is not None:
        lo, hi = dataset.model_range
        bpd = bits_per_dim(-nll, dim=dim, levels=dataset.levels, lo=lo, hi=hi)
        out.update(
            bpd=float(bpd.mean()),
            bpd_stderr=None if out["stderr"] is None else out["stderr"] / (dim * math.log(2)),
            dequant_draws=int(lc["dequant_draws"]),
            dequantization=lc.get("dequantization", "uniform"),
            importance_samples=int(lc.get("importance_samples", 1)),
        )
    if dataset.mixture is not None:
        exact = -dataset.mixture.log_prob(x.double()).cpu()
        out.update(
            exact_nll_nats=float(exact.mean()),
            gap=float((nll - exact).mean()),
            gap_stderr=_mean_stderr(nll - exact),
        )
    return out


def _bound_name(lc: dict, dataset: Dataset) -> str | None:
    """What method=vlb computed, in words (None for the other methods)."""
    if lc["method"] != "vlb":
        return None
    what = (
        "continuous-time VLB (VDM, Kingma et al. 2021)"
        if lc.get("steps") is None
        else f"discrete {int(lc['steps'])}-step VLB (DDPM, Ho et al. 2020, eq. 5)"
    )
    on = (
        f"on the {dataset.levels}-level discrete data (discretised decoder)"
        if dataset.kind == "images" and dataset.levels is not None
        else "on the density (Gaussian decoder)"
    )
    return f"{what} {on}, decoder at t0 = eps = {lc['eps']}"


def summary_line(s: dict) -> str:
    """One line: nll 1.234 nats (± 0.012, n=500), bpd ..., exact 1.228, gap 0.006, nfe 98, 3.2 s"""
    bound = {"elbo": " (elbo bound)", "vlb": " (vlb bound)"}.get(s["method"], "")
    parts = [f"nll{bound} {s['nll_nats']:.4f} nats ({_pm(s['stderr'])}, n={s['n']})"]
    if s["bpd"] is not None:
        parts.append(f"bpd {s['bpd']:.4f} ({_pm(s['bpd_stderr'])})")
    if s["exact_nll_nats"] is not None:
        parts.append(
            f"exact {s['exact_nll_nats']:.4f}, gap {s['gap']:.2g} ({_pm(s['gap_stderr'])})"
        )
    if s.get("ode_nll_nats") is not None:  # method=vlb: the same model's ODE value
        ode = f"bpd {s['ode_bpd']:.4f}" if s.get("ode_bpd") is not None else "nll"
        if s.get("ode_bpd") is None:
            ode += f" {s['ode_nll_nats']:.4f} nats"
        parts.append(f"PF-ODE {ode} (nfe {s['ode_nfe_mean']:.0f})")
    label = "score evals/point" if s["method"] in ("elbo", "vlb") else "nfe"
    spread = "" if s["method"] in ("elbo", "vlb") else f" (max {s['nfe_max']})"
    parts.append(f"{label} {s['nfe_mean']:.0f}{spread}, {s['seconds']:.1f} s")
    if s.get("batches_reused"):
        parts.append(f"{s['batches_reused']}/{s['batches']} batches from the cache")
    return ", ".join(parts)


def _cache(
    cfg: dict,
    ckpt_path: Path | None,
    device: torch.device,
    batches: list[torch.Tensor],
    checkpoint_sha256: str | None = None,
) -> tuple[Path, list[Path], list[BatchResult | None]]:
    """The cache folder, each batch's file in it, and the batches already finished there.
    Under torchrun each rank has its own, under its own outputs_root."""
    material = cache_material(cfg, ckpt_path, device, checkpoint_sha256)
    cache_dir = Path(cfg["outputs_root"]) / "nll_cache" / cache_key(material)
    if not (cache_dir / "key.json").is_file():
        atomic_write_text(cache_dir / "key.json", json.dumps(material, indent=2))
    files = [
        cache_dir / f"batch_{i:05d}_{_sha256_tensor(b)[:16]}.json" for i, b in enumerate(batches)
    ]
    results = [_read_cached(f, b.shape[0]) for f, b in zip(files, batches)]
    reused = sum(r is not None for r in results)
    if reused:
        log.info(f"reusing {reused} of {len(batches)} batches from {cache_dir}")
    return cache_dir, files, results


def _solve(
    sde: SDE, model, x: torch.Tensor, dataset: Dataset, lc: dict, seed: int, index: int, first: int
) -> BatchResult:
    """evaluate_batch of batch `index`, whose first point is the test split's `first`, with the
    solvers' numerical failures turned into one-line user errors."""
    if lc["method"] == "elbo":
        generator = torch.Generator(x.device).manual_seed(batch_seed(seed, index))
    else:  # each point's draws keyed by its index: the same in any batch
        points = torch.arange(first, first + x.shape[0], device=x.device)
        generator = KeyedNoise.for_indices(seed, points, 0x6E6C6C)
    try:
        return evaluate_batch(sde, model, x, dataset, lc, generator)
    except (AssertionError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "underflow" not in msg and "solve_ivp failed" not in msg:
            raise
        raise UserError(
            f"the ODE solver failed ({msg}); loosen likelihood.rtol/atol, raise likelihood.eps "
            "or try likelihood.solver / likelihood.backend=scipy"
        ) from None


def resolve_threads(lc: dict, dataset: Dataset, device: torch.device) -> int | None:
    """CPU threads for the evaluation (None: leave torch's setting). threads=auto takes one for
    point data on the CPU: its per-call work is too small for a second thread to pay, and on a
    shared CPU the threads' synchronisation costs ~15x (gmm8: 58 s with 2 threads, 3.7 s with 1)."""
    if lc["threads"] != "auto":
        return int(lc["threads"])
    return 1 if device.type == "cpu" and dataset.kind == "points" else None


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch.set_num_threads(n) inside the block (nothing for None), restored after it."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_divergence(lc: dict, dataset: Dataset) -> dict:
    """likelihood config with divergence=auto made concrete: the exact trace for point data
    (D vector-Jacobian products per evaluation), Hutchinson's estimator for images."""
    if lc["divergence"] != "auto":
        return lc
    return {**lc, "divergence": "exact" if dataset.kind == "points" else "hutchinson"}


def _compute(
    sde: SDE,
    model,
    dataset: Dataset,
    cfg: dict,
    device: torch.device,
    batches: list[torch.Tensor],
    files: list[Path],
    results: list[BatchResult | None],
    mine: list[int],
    logger: RunLogger,
    show: bool,
) -> None:
    """Evaluate this rank's batches (`mine`) missing from `results` (filled in place), each
    saved to its file as soon as it is done. Each batch is solved on its own: no collective
    runs inside a solver, so ranks whose adaptive solvers take different steps never wait."""
    lc = cfg["likelihood"]
    done = sum(batches[i].shape[0] for i in mine if results[i] is not None)
    total = sum(batches[i].shape[0] for i in mine)
    with tqdm(total=total, initial=done, desc="nll", disable=not show) as bar:
        for i in mine:
            b, path = batches[i], files[i]
            if results[i] is not None:
                continue
            x = b.to(device, DTYPES[lc["dtype"]])
            first = sum(batches[j].shape[0] for j in range(i))
            results[i] = r = _solve(sde, model, x, dataset, lc, int(cfg["seed"]), i, first)
            atomic_write_text(path, json.dumps(r.to_json()))
            nll = -sum(r.logp) / len(r.logp)
            bar.update(b.shape[0])
            bar.set_postfix(nll=f"{nll:.4g}")
            logger.log({"batch_nll_nats": nll, "batch_nfe": sum(r.nfe) / len(r.nfe)}, step=i)


ODE_BESIDE_VLB = ("nll_nats", "stderr", "bpd", "bpd_stderr", "nfe_mean", "nfe_max")


def _evaluate(cfg: dict, sde, model, dataset, x, info, ckpt_path, sha, logger) -> dict:
    """Evaluate (or reuse from the cache) every batch of x by cfg's likelihood settings;
    on rank 0 the summary (see `summarise`), on the others {}."""
    lc, device, main = cfg["likelihood"], info.device, info.is_main
    batches = list(x.split(int(lc["batch_size"])))
    mine = my_items(len(batches), info)
    cache_dir, files, results = _cache(cfg, ckpt_path, device, batches, sha)
    cached = [r is not None for r in results]  # before this run: found in this rank's cache
    what = {"elbo": "ELBO", "vlb": "VLB"}.get(lc["method"], f"PF-ODE ({lc['solver']}, "
                                                            f"{lc['divergence']})")  # fmt: skip
    procs = f"{info.world_size} process{'es' if info.world_size > 1 else ''}"
    log.info(
        f"nll of {x.shape[0]} {dataset.name} test points by {what}, {len(batches)} batches, {procs}"
    )
    with cpu_threads(resolve_threads(lc, dataset, device)):
        show = bool(cfg.get("progress", True)) and main
        _compute(sde, model, dataset, cfg, device, batches, files, results, mine, logger, show)
        used_threads = torch.get_num_threads()
    gathered = gather_to_main({i: (results[i].to_json(), cached[i]) for i in mine}, info)
    if not main:
        return {}
    results = [BatchResult.from_json(gathered[i][0], b.shape[0]) for i, b in enumerate(batches)]
    for i, r in enumerate(results):  # the other ranks' batches, into this cache
        if not files[i].is_file():
            atomic_write_text(files[i], json.dumps(r.to_json()))
    summary = summarise(cfg, dataset, x, results, ckpt_path)
    summary.update(
        threads=used_threads if device.type == "cpu" else None,
        batches=len(batches),
        batches_reused=sum(gathered[i][1] for i in range(len(batches))),
        world_size=info.world_size,
        device=device.type,
        cache_dir=str(cache_dir),
    )
    return summary


def run_nll(cfg: dict, out_dir: Path) -> dict:
    """Evaluate the test split's NLL, reusing cached batches; write out_dir/nll.json.

    Under torchrun the batches are split across the ranks (batch i on rank i mod W), each rank
    solves and caches its own (in the cache under its own outputs_root), and rank 0 gathers the
    results through the process group into the one nll.json, in batch order: the numbers are
    those of a single process, since each batch's random draws are seeded by (seed, batch
    index). Rank 0 also caches the batches it received, so a later run on its machine, with
    any number of processes, reuses them; no rank reads another's files."""
    start = time.perf_counter()
    info = start_processes(cfg)
    # rank 0's run folder is the run's: the others write nothing there (it may be on another
    # machine) and only name it
    out_dir = Path(broadcast_object(str(out_dir), info))
    device, main = info.device, info.is_main
    try:
        sde, dataset, model, ckpt_path = load_score_model(cfg, checkpoint_from_main(info))
        check_dequantization(cfg["likelihood"], dataset)
        # the cache key names the checkpoint by its file's hash: rank 0 has the file
        sha = share_from_main(lambda: None if ckpt_path is None else file_sha256(ckpt_path), info)
        lc = resolve_divergence(cfg["likelihood"], dataset)
        model.to(device, DTYPES[lc["dtype"]])
        x = _test_points(dataset, lc["n_points"])
        logger_cfg = cfg["logger"] if main else {**cfg["logger"], "mode": "disabled"}
        logger = RunLogger(logger_cfg, out_dir, cfg, "nll")
        try:
            run = (sde, model, dataset, x, info, ckpt_path, sha, logger)
            summary = _evaluate({**cfg, "likelihood": lc}, *run)
            if lc["method"] == "vlb" and lc.get("with_ode", True):
                # the same model's PF-ODE bits/dim on the same points, beside its bound
                ode = resolve_divergence({**lc, "method": "ode", "divergence": "auto"}, dataset)
                ode_summary = _evaluate({**cfg, "likelihood": ode}, *run)
                if main:
                    summary.update({f"ode_{k}": ode_summary[k] for k in ODE_BESIDE_VLB})
            if main:
                summary["seconds"] = time.perf_counter() - start
                atomic_write_text(Path(out_dir) / "nll.json", json.dumps(summary, indent=2))
                logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        finally:
            logger.finish()
    finally:
        teardown(info)
    if not main:
        return {}
    if not math.isfinite(summary["nll_nats"]):
        log.warning("some points have a non-finite log-likelihood (see the cached batches)")
    log.info(summary_line(summary))
    return summary
