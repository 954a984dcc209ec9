"""Benchmark the fast samplers: NFE x solver x grid x SDE on gmm8 and mix5d with their exact scores.

    python bench/fast_samplers.py [--n 4000] [--nfe 5,6,8,10,15,20] [--seed 7] [--best 3]

Each cell is |delta mean exact log-density| of the samples against 200 000 fresh draws (the
goal of issue 10: <= 0.05 at NFE 10, <= 0.03 at NFE 20), then the sliced W2 to n fresh draws.
The header gives the fresh-vs-fresh floor of both at the same n. NFE counts the final Tweedie
denoising: solver steps = NFE - 1 (Heun: NFE / 2 steps, even NFE only). "fast" rows use the
per-SDE defaults of samplers/fast.py (their own grid; the grid column reads "auto").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import samplers  # noqa: E402
from data.mixtures import gmm8, mixture5d  # noqa: E402
from metrics.quality import sliced_wasserstein  # noqa: E402
from models import MixtureScore  # noqa: E402
from sde_lib import VESDE, VPSDE, subVPSDE  # noqa: E402

SDES = {"vp": VPSDE, "subvp": subVPSDE, "ve": VESDE}
LAWS = {"gmm8": gmm8, "mix5d": mixture5d}
SOLVERS = {  # name -> (sampler, options)
    "ddim": ("ddim", {}),
    "dpm++2m": ("dpm_solver", {}),
    "dpm++3m": ("dpm_solver3", {}),
    "unipc3": ("unipc", {}),
    "unipc3-nolof": ("unipc", dict(lower_order_final=False)),
    "ipndm4": ("ipndm", {}),
    "heun": ("heun", {}),
}


def steps_for(sampler: str, nfe: int) -> int | None:
    if sampler == "heun":
        return nfe // 2 if nfe % 2 == 0 else None
    return nfe - 1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--nfe", default="5,6,8,10,15,20")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--best", type=int, default=3, help="also list the best N (solver, grid)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    nfes = [int(v) for v in a.nfe.split(",")]
    for law_name, make in LAWS.items():
        law = make()
        big = law.sample(200_000, torch.Generator().manual_seed(1)).double()
        fresh_ll = law.log_prob(big).mean().item()
        f1, f2 = (law.sample(a.n, torch.Generator().manual_seed(s)) for s in (2, 3))
        floor_ll = abs(law.log_prob(f1.double()).mean().item() - fresh_ll)
        floor_sw = sliced_wasserstein(f1, f2)
        print(f"\n## {law_name}: n={a.n}, fresh |dlogp| {floor_ll:.3f}, fresh-vs-fresh sliced W2 "
              f"{floor_sw:.3f}")  # fmt: skip
        for sde_name, cls in SDES.items():
            sde = cls()
            score = MixtureScore(sde, law)
            rows = [("fast", "fast", {}, "auto")]
            rows += [(label, s, o, g) for label, (s, o) in SOLVERS.items() for g in samplers.GRIDS
                     if not (s == "ddim" and sde_name == "ve")]  # fmt: skip
            print(f"\n{sde_name:6s} {'solver':13s} {'grid':9s} " +
                  " ".join(f"NFE {n:<11d}" for n in nfes))  # fmt: skip
            table = {}
            for label, sampler, options, grid in rows:
                cells = []
                for nfe in nfes:
                    steps = steps_for(sampler, nfe)
                    if steps is None or steps < 1:
                        cells.append(f"{'-':15s}")
                        continue
                    opts = dict(options) if grid == "auto" else dict(options, grid=grid)
                    g = torch.Generator().manual_seed(a.seed)
                    x, _ = samplers.sample(sde, score, (a.n, law.dim), sampler, steps, generator=g,
                                           **opts)  # fmt: skip
                    d = abs(law.log_prob(x.double()).mean().item() - fresh_ll)
                    d = d if d == d else float("inf")
                    table[(label, grid, nfe)] = d
                    sw = sliced_wasserstein(x.float(), f2) if d < 1e3 else float("inf")
                    cells.append(f"{min(d, 99.99):5.3f} {min(sw, 9.99):5.3f}    ")
                print(f"{'':6s} {label:13s} {grid:9s} " + " ".join(cells), flush=True)
            for nfe in nfes:
                best = sorted((v, k[0], k[1]) for k, v in table.items() if k[2] == nfe)
                print(f"{'':6s} best at NFE {nfe}: " + ", ".join(
                    f"{s}/{g} {v:.3f}" for v, s, g in best[: a.best]))  # fmt: skip


if __name__ == "__main__":
    main()
