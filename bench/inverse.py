"""Inverse-problem samplers against the exact posterior of a Gaussian-mixture prior.

    python bench/inverse.py [--n 1000] [--seed 0] [--laws gmm8,mix5d] [--sde vp]

For each law the first --n test points x give measurements y = A x + sigma_y e:
    gmm8   A = [1, 0] (the first coordinate observed; the posterior is bimodal or worse)
    mix5d  A = a fixed 2 x 5 Gaussian matrix (seed 3, rows normalised)
Every method draws one posterior sample per measurement with the law's exact score
(models.exact.MixtureScore), so what remains is the method's own bias. The distance is the
maximum mean discrepancy between the pairs (draw, y) and (exact posterior draw, y) over all
measurements, divided by its floor (the root mean square of 3 fresh exact sets against the same
reference): 1 is as good as exact. NFE counts score evaluations; dps, pigdm and tds also
back-propagate through each (tds on `particles` copies). Prints one markdown table per law.

    python bench/inverse.py --images CKPT [--data digits] [--n-images 64]

runs sampler.task=inverse through run.py's own dispatch with a trained image model: every
method at its default steps, except DPS and the replacement method at 200 and TDS at 100 with 4
particles (IMAGE_STEPS: a 2-core CPU), on the mask (left half), blur (std 1 px)
and downsample (x2) operators with sigma_y = 0.05, on the first --n-images test images. Prints
the measurement residual ||A x - y|| (beside the truth's), the mean squared error to the truth
and the seconds; the pictures (measurement | reconstruction | truth) are written under
bench_out/inverse/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CONF = Path(__file__).resolve().parents[1] / "conf"

from data.mixtures import gmm8, mixture5d  # noqa: E402
from models.exact import MixtureScore  # noqa: E402
from samplers.inverse import posterior_sample  # noqa: E402
from samplers.operators import build_operator  # noqa: E402
from sde_lib import KeyedNoise, sde_from_config  # noqa: E402
from tasks.inverse import MEASUREMENT_STREAM, posterior_distance  # noqa: E402
from tasks.sample import sample_noise  # noqa: E402

RUNS = [
    ("dps", {"steps": 100}),
    ("dps", {"steps": 1000}),
    ("pigdm", {"steps": 20}),
    ("pigdm", {"steps": 100}),
    ("ddrm", {"steps": 20}),
    ("ddrm", {"steps": 100}),
    ("replacement", {"steps": 100}),
    ("replacement", {"steps": 1000}),
    ("tds", {"steps": 100, "particles": 1}),
    ("tds", {"steps": 100, "particles": 4}),
    ("tds", {"steps": 100, "particles": 16}),
    ("tds", {"steps": 100, "particles": 64}),
    ("tds", {"steps": 400, "particles": 16}),
]


def problem(name: str):
    if name == "gmm8":
        return gmm8(), torch.tensor([[1.0, 0.0]])
    a = torch.randn(2, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return mixture5d(), a / a.norm(dim=1, keepdim=True)


# steps of the image table where a method's default is too slow for a 2-core CPU
IMAGE_STEPS = {"dps": 200, "replacement": 200, "tds": 100}


def images(ckpt: str, data: str, n: int) -> None:
    from omegaconf import OmegaConf

    from tasks import dispatch

    root = Path("bench_out/inverse").resolve()
    print(f"\n{data}, {ckpt}, sigma_y=0.05, {n} test images")
    print("| operator | method | NFE | residual (truth) | MSE to truth | seconds |")
    print("|---|---|---|---|---|---|")
    for operator in ("mask", "blur", "downsample"):
        for method in ("dps", "pigdm", "ddrm", "replacement", "tds"):
            steps = IMAGE_STEPS.get(method)
            overrides = [
                *([f"sampler.inverse_steps={steps}"] if steps else []),
                "mode=sample", f"data={data}", f"ckpt={ckpt}", "sampler.task=inverse",
                f"sampler.operator={operator}", f"sampler.inverse_method={method}",
                f"sampler.n_samples={n}", "sampler.particles=4", f"outputs_root={root}",
                "logger.mode=disabled", "progress=false",
            ]  # fmt: skip
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
            out = root / data / f"{operator}_{method}"
            out.mkdir(parents=True, exist_ok=True)
            m = dispatch(cfg, out)
            print(
                f"| {operator} | {method} | {m['nfe']} | {m['residual_mean']:.3f} "
                f"({m['residual_of_truth']:.3f}) | {m['mse_to_truth']:.4f} | {m['seconds']:.1f} |",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--laws", default="gmm8,mix5d")
    p.add_argument("--sde", default="vp")
    p.add_argument("--sigma-y", default="0.1,0")
    p.add_argument("--images", default=None, help="a trained image checkpoint: the image table")
    p.add_argument("--data", default="digits")
    p.add_argument("--n-images", type=int, default=64)
    a = p.parse_args()
    if a.images:
        images(a.images, a.data, a.n_images)
        return
    sde = sde_from_config({"name": a.sde})
    for law in a.laws.split(","):
        mix, matrix = problem(law)
        op = build_operator("matrix", (mix.dim,), matrix=matrix)
        score = MixtureScore(sde, mix)
        x = mix.sample(a.n, torch.Generator().manual_seed(a.seed + 1))
        idx = torch.arange(a.n)
        for sigma_y in (float(v) for v in a.sigma_y.split(",")):
            e = KeyedNoise.for_indices(a.seed, idx, MEASUREMENT_STREAM).randn(
                (a.n, op.m), torch.float64
            )
            y = (op(x.double()) + sigma_y * e).float()
            print(f"\n{law}, sde={a.sde}, A {tuple(op.matrix.shape)}, sigma_y={sigma_y}, n={a.n}")
            print("| method | steps | particles | NFE | MMD / floor | residual | seconds |")
            print("|---|---|---|---|---|---|---|")
            for method, opts in RUNS:
                if method == "tds" and sigma_y == 0:
                    continue
                t0 = time.perf_counter()
                draw, nfe = posterior_sample(
                    method, sde, score, op, y, sigma_y=sigma_y,
                    generator=sample_noise(a.seed, idx), **opts,
                )  # fmt: skip
                sec = time.perf_counter() - t0
                d = posterior_distance(mix, op, y, draw, sigma_y, 1, a.seed)
                resid = (op(draw.double()) - y.double()).norm(dim=1).mean()
                print(
                    f"| {method} | {opts['steps']} | {opts.get('particles', '')} | {nfe} | "
                    f"{d['posterior_mmd_ratio']:.2f} | {resid:.3f} | {sec:.1f} |",
                    flush=True,
                )
            resid_truth = (op(x.double()) - y.double()).norm(dim=1).mean()
            print(f"(floor {d['posterior_mmd_floor']:.4f}; the truth's residual {resid_truth:.3f})")


if __name__ == "__main__":
    main()
