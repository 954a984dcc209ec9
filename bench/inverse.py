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
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.mixtures import gmm8, mixture5d
from models.exact import MixtureScore
from samplers.inverse import posterior_sample
from samplers.operators import build_operator
from sde_lib import KeyedNoise, sde_from_config
from tasks.inverse import MEASUREMENT_STREAM, posterior_distance
from tasks.sample import sample_noise

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--laws", default="gmm8,mix5d")
    p.add_argument("--sde", default="vp")
    p.add_argument("--sigma-y", default="0.1,0")
    a = p.parse_args()
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
