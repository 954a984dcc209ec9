"""FID of every stochastic sampler, the best ODE sampler and fast with grid=auto, per NFE budget.

    python bench/sampler_fid.py [--data digits,mnist] [--nfe 10,20,50]
                                [--n-samples digits:1000,mnist:500]
                                [--outputs-root bench_out/recipes]

The models are the "today" recipe of bench/recipes.py (sde=vp, eps prediction, the same U-Net,
steps and seed; trained there, or reused from --outputs-root), so cells that bench already drew
(same checkpoint, sampler settings, seed and sample count) are reused. Each candidate runs
through run.py's own mode=sample code (seed 1) at the largest step count whose score
evaluations, the final denoising included, fit the budget; the NFE column is the count the run
reports. ODE candidates are fast on its shipped table (grid=null), UniPC, DPM-Solver++(3M) and
EDM's Heun sampler; the best of them at each budget is chosen by FID against the training split
and reported by FID against the test split, so the choice never sees the reported data.
fast with grid=auto fits its schedule to the checkpoint first (cached in
--outputs-root/schedules; its fitting time is printed apart from sampling). The stochastic
candidates are every stochastic sampler of the toolkit: Euler-Maruyama, DDPM's ancestral
sampler, predictor-corrector (2 evaluations a step), SDE-DPM-Solver++(2M) and (3M), Restart
(fewer restarts at small budgets) and EDM's sampler with churn (S_churn 40, as in bench/recipes).
The floor is the FID of as many training images against the same test split. Prints markdown
tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipes import compose, sample, train  # noqa: E402

from sde_lib.io import file_sha256  # noqa: E402

ODE = ("fast", "unipc", "dpm_solver3", "heun")
CHURN = ["sampler.S_churn=40", "sampler.S_tmin=0.05", "sampler.S_tmax=50", "sampler.S_noise=1.003"]


def restart_options(nfe: int) -> list[str]:
    """Restart's re-noising at a budget: one restart of one step below 20 NFE, one of two below
    50, else its defaults (two restarts of three steps)."""
    if nfe < 20:
        return ["sampler.restart_k=1", "sampler.restart_steps=1"]
    if nfe < 50:
        return ["sampler.restart_k=1", "sampler.restart_steps=2"]
    return []


def settings(nfe: int) -> dict[str, list[str]]:
    """Candidate name -> its run overrides (without steps) at a budget."""
    return {
        "fast": ["sampler=fast", "sampler.grid=null"],
        "unipc": ["sampler=unipc"],
        "dpm_solver3": ["sampler=dpm_solver3"],
        "heun": ["sampler=edm", "sampler.denoise=false"],
        "fast_auto": ["sampler=fast", "sampler.grid=auto"],
        "em": ["sampler=em"],
        "ancestral": ["sampler=ancestral"],
        "pc": ["sampler=pc"],
        "dpmpp_2m_sde": ["sampler=dpmpp_2m_sde"],
        "dpmpp_3m_sde": ["sampler=dpmpp_3m_sde"],
        "restart": ["sampler=restart", *restart_options(nfe)],
        "edm_churn": ["sampler=edm", "sampler.denoise=false", *CHURN],
    }


def nfe_of(root: Path, opts: list[str], steps: int) -> int:
    """The score evaluations of one run of these settings at `steps` (counted on the exact VP
    score of gmm8: a sampler's count does not depend on the model)."""
    import samplers
    from data.mixtures import gmm8
    from models.exact import MixtureScore
    from sde_lib import VPSDE
    from tasks.sample import sampler_call_options

    c = compose(root, [*opts, f"sampler.steps={steps}"])["sampler"]
    sde = VPSDE()
    options = {k: v for k, v in sampler_call_options(c).items() if v is not None}
    options = {k: v for k, v in options.items() if k != "grid" or v != "auto"}
    _, nfe = samplers.sample(
        sde, MixtureScore(sde, gmm8()), (2, 2), c["name"], steps, eps=c["eps"],
        denoise=c["denoise"], **options,
    )  # fmt: skip
    return nfe


def steps_within(root: Path, opts: list[str], budget: int) -> int:
    """The largest step count whose evaluations fit the budget."""
    for steps in range(budget, 0, -1):
        if nfe_of(root, opts, steps) <= budget:
            return steps
    raise ValueError(f"{opts} cannot run within {budget} evaluations")


def cell(results: dict, name: str, nfe: int, tag: str = "") -> str:
    r = results.get((name, nfe))
    return "–" if r is None else f"{r['fid_test']:.2f}{tag} ({r['nfe']})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="digits,mnist")
    p.add_argument("--steps", default="digits:2000,mnist:800", help="training steps (recipes)")
    p.add_argument("--network", default="mnist:model=unet,mnist:model.ch=16")
    p.add_argument("--nfe", default="10,20,50")
    p.add_argument("--n-samples", default="digits:1000,mnist:500")
    p.add_argument("--candidates", default=",".join(settings(10)))
    p.add_argument("--outputs-root", default="bench_out/recipes")
    a = p.parse_args()
    root = Path(a.outputs_root).resolve()
    train_steps = {k: int(v) for k, v in (kv.split(":") for kv in a.steps.split(","))}
    n_samples = {k: int(v) for k, v in (kv.split(":") for kv in a.n_samples.split(","))}
    network: dict[str, list[str]] = {}
    for kv in filter(None, a.network.split(",")):
        name, override = kv.split(":", 1)
        network.setdefault(name, []).append(override)
    budgets = [int(v) for v in a.nfe.split(",")]
    wanted = a.candidates.split(",")
    for data in a.data.split(","):
        net = network.get(data, [])
        ckpt, _ = train(root, data, "today", train_steps[data], net)
        results: dict[tuple[str, int], dict] = {}
        for nfe in budgets:
            for name, opts in settings(nfe).items():
                if name not in wanted:
                    continue
                steps = steps_within(root, opts, nfe)
                label = name if name in ("fast", "heun", "edm_churn", "unipc") else f"sfid_{name}"
                r = sample(root, data, "today", ckpt, f"{label}_{nfe}",
                           [*opts, f"sampler.steps={steps}"], n_samples[data], net)  # fmt: skip
                results[(name, nfe)] = r
                print(f"{data} {name} {nfe}: {json.dumps(r)}", file=sys.stderr, flush=True)
        floor = next(iter(results.values()))["fid_floor"]
        print(f"\n### data={data}: {n_samples[data]} samples, FID against the test split "
              f"(floor {floor:.2f})\n")  # fmt: skip
        print("| sampler | " + " | ".join(f"{n} NFE" for n in budgets) + " |")
        print("|---" * (1 + len(budgets)) + "|")

        best = []
        for nfe in budgets:
            ode = [n for n in ODE if (n, nfe) in results]
            pick = min(ode, key=lambda n: results[(n, nfe)]["fid_train"]) if ode else None
            best.append("–" if pick is None else cell(results, pick, nfe, f", {pick}"))
        print("| best ODE (chosen on the training split) | " + " | ".join(best) + " |")
        for name in [n for n in settings(10) if n in wanted]:
            print(f"| {name} | " + " | ".join(cell(results, name, nfe) for nfe in budgets) + " |")
        print("\n| sampler | NFE budget | NFE | FID vs train | FID vs test | s |")
        print("|---|---|---|---|---|---|")
        for (name, nfe), r in results.items():
            print(f"| {name} | {nfe} | {r['nfe']} | {r['fid_train']:.2f} | {r['fid_test']:.2f} | "
                  f"{r['seconds']:.0f} |")  # fmt: skip
        fits = sorted((root / "schedules").glob("fast_*.json"))
        sha = file_sha256(Path(ckpt))
        for path in fits:
            rec = json.loads(path.read_text())
            if rec.get("checkpoint_sha256") != sha:  # another data set's model
                continue
            auto = rec.get("auto", {})
            print(f"\ngrid=auto {path.name}: {auto.get('choice')} (squared error to the model's "
                  f"flow: fitted {auto.get('mse_fitted', float('nan')):.3g}, shipped "
                  f"{auto.get('mse_default', float('nan')):.3g}; fitted in "
                  f"{auto.get('fit_seconds', float('nan')):.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
