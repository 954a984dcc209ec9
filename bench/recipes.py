"""Compare training recipes at equal steps and network: today's default, EDM's, rectified flow.

    python bench/recipes.py [--data digits,mnist] [--steps digits:2000,mnist:800]
                            [--network mnist:model=unet,mnist:model.ch=16]
                            [--nfe 10,20,35] [--n-samples digits:1000,mnist:500]
                            [--samplers digits:fast+unipc+heun+edm_churn,mnist:fast+heun+edm_churn]
                            [--outputs-root bench_out/recipes]

Each recipe is trained with run.py's own mode=train code (same U-Net, batch, optimiser, EMA,
steps and seed; only the process, parameterisation, noise levels and loss weight differ; on
MNIST the U-Net has 16 base channels instead of 32, to fit a 2-core CPU):

    today      sde=vp, eps prediction, t ~ U(eps, 1), lambda = sigma^2 (the default run)
    edm        sde=ve (sigma 0.002 .. 80), EDM's preconditioning, ln sigma ~ N(-1.2, 1.2^2),
               EDM's lambda, no importance weights (Karras et al. 2022)
    rectified  sde=rectified, velocity prediction (flow matching / rectified flow)

At each NFE budget each candidate sampler (--samplers) draws --n-samples images (mode=sample,
seed 1): `fast` (its shipped per-SDE defaults), `unipc`, and EDM's Heun sampler without and with
churn, each at the largest step count within the budget. A recipe's "best sampler" at a budget
is chosen by FID against the training split, and reported by FID against the test split (with
the floor: as many training images scored against the same test split), so that the choice
never sees the data of the reported figure. Test bits/dim: the PF-ODE (mode=nll, Hutchinson,
1 dequantisation draw) on the test split (digits: all 180; MNIST: the first 100). Checkpoints,
samples and results are reused from --outputs-root, so an interrupted run continues. Prints
markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = {
    "today": ["sde=vp"],
    "edm": [
        "sde=ve",
        "sde.sigma_min=0.002",
        "sde.sigma_max=80",
        "model.parameterisation=edm",
        "training.noise=lognormal",
        "training.weighting=edm",
        "training.importance_weights=false",
    ],
    "rectified": ["sde=rectified", "model.parameterisation=flow"],
}


def candidates(nfe: int) -> dict[str, list[str]]:
    """Sampler settings whose evaluations fit the budget (Heun: 2 steps - 1, no final denoising,
    as in EDM; fast / unipc: steps + 1 with the final Tweedie denoising)."""
    heun = (nfe + 1) // 2
    churn = [
        "sampler.S_churn=40",
        "sampler.S_tmin=0.05",
        "sampler.S_tmax=50",
        "sampler.S_noise=1.003",
    ]
    return {
        "fast": ["sampler=fast", "sampler.grid=null", f"sampler.steps={nfe - 1}"],
        "unipc": ["sampler=unipc", f"sampler.steps={nfe - 1}"],
        "heun": ["sampler=edm", f"sampler.steps={heun}", "sampler.denoise=false"],
        "edm_churn": ["sampler=edm", f"sampler.steps={heun}", "sampler.denoise=false", *churn],
    }


def compose(outputs_root: Path, overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    base = [f"outputs_root={outputs_root}", "logger.mode=disabled", "progress=false"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[*base, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def run(outputs_root: Path, out: Path, overrides: list[str]) -> dict:
    """Run one mode in-process (run.py's dispatch) with its outputs in `out`; return its summary."""
    from tasks import dispatch
    from tasks.validate import validate

    cfg = compose(outputs_root, overrides)
    validate(cfg)
    out.mkdir(parents=True, exist_ok=True)
    return dispatch(cfg, out)


def train(root: Path, data: str, recipe: str, steps: int, net: list[str]) -> tuple[Path, float]:
    """The recipe's final checkpoint (trained now, or reused) and the training seconds."""
    out = root / data / recipe / "train"
    done = out / "done.json"
    if done.is_file():
        d = json.loads(done.read_text())
        return Path(d["ckpt"]), d["seconds"]
    t0 = time.perf_counter()
    overrides = ["mode=train", f"data={data}", *RECIPES[recipe], *net, f"training.steps={steps}"]
    run(root / data / recipe, out, [*overrides, f"training.ckpt_every={steps}"])
    ckpt = sorted((out / "checkpoints").glob("ckpt_*.pt"))[-1]
    seconds = time.perf_counter() - t0
    done.write_text(json.dumps({"ckpt": str(ckpt), "seconds": seconds}))
    return ckpt, seconds


def fid_against_train(data: str, samples_path: Path, root: Path) -> float:
    """FID of the samples against the training split's features (the selection criterion)."""
    import numpy as np

    from metrics.features import build_features
    from metrics.fid import fid_from_features
    from metrics.images import dataset_uint8, raw_to_uint8, reference_features
    from tasks.common import build_dataset

    dataset = build_dataset({"name": data})
    train_u8, test_u8 = dataset_uint8(dataset, "train"), dataset_uint8(dataset, "test")
    cfg = compose(root, [f"data={data}"])
    feats = build_features(dataset, train_u8, test_u8, cfg)
    f_train, _ = reference_features(dataset, feats, train_u8, test_u8, root / "features")
    x = raw_to_uint8(dataset, np.load(samples_path)["samples"])
    return fid_from_features(feats(x), f_train)


def sample(root: Path, data: str, recipe: str, ckpt: Path, name: str, opts: list[str], n: int,
           net: list[str]):  # fmt: skip
    out = root / data / recipe / "sample" / name
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = ["mode=sample", f"data={data}", *RECIPES[recipe], *net, f"ckpt={ckpt}", *opts]
    overrides += [f"sampler.n_samples={n}", f"sampler.batch_size={min(n, 500)}", "seed=1"]
    t0 = time.perf_counter()
    summary = run(root, out, overrides)
    seconds = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    result = {
        "nfe": summary["nfe"],
        "seconds": seconds,
        "fid_test": metrics["fid"],
        "fid_floor": metrics["fid_floor_test_vs_train"],
        "fid_train": fid_against_train(data, out / "samples.npz", root),
    }
    done.write_text(json.dumps(result))
    return result


def nll(root: Path, data: str, recipe: str, ckpt: Path, n_points: int, net: list[str]) -> dict:
    out = root / data / recipe / "nll"
    if (out / "nll.json").is_file():
        return json.loads((out / "nll.json").read_text())
    overrides = ["mode=nll", f"data={data}", *RECIPES[recipe], *net, f"ckpt={ckpt}"]
    run(root, out, [*overrides, f"likelihood.n_points={n_points}", "likelihood.batch_size=100"])
    return json.loads((out / "nll.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="digits,mnist")
    p.add_argument("--steps", default="digits:2000,mnist:800")
    p.add_argument("--nfe", default="10,20,35")
    p.add_argument("--n-samples", default="digits:1000,mnist:500")
    p.add_argument(
        "--samplers", default="digits:fast+unipc+heun+edm_churn,mnist:fast+heun+edm_churn"
    )
    p.add_argument("--nll-points", default="digits:180,mnist:100")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument(
        "--network",
        default="mnist:model=unet,mnist:model.ch=16",
        help="per data set, run.py overrides of the network shared by all recipes",
    )
    p.add_argument("--outputs-root", default="bench_out/recipes")
    a = p.parse_args()
    root = Path(a.outputs_root).resolve()
    steps = dict(kv.split(":") for kv in a.steps.split(","))
    points = dict(kv.split(":") for kv in a.nll_points.split(","))
    n_samples = {k: int(v) for k, v in (kv.split(":") for kv in a.n_samples.split(","))}
    kinds = {k: v.split("+") for k, v in (kv.split(":") for kv in a.samplers.split(","))}
    network: dict[str, list[str]] = {}
    for kv in filter(None, a.network.split(",")):
        name, override = kv.split(":", 1)
        network.setdefault(name, []).append(override)
    budgets = [int(v) for v in a.nfe.split(",")]
    for data in a.data.split(","):
        rows, best = [], []
        for recipe in a.recipes.split(","):
            ckpt, train_s = train(root, data, recipe, int(steps[data]), network.get(data, []))
            net = network.get(data, [])
            bpd = nll(root, data, recipe, ckpt, int(points[data]), net)
            per_budget = {}
            for nfe in budgets:
                results = {}
                for name, opts in candidates(nfe).items():
                    if name not in kinds[data]:
                        continue
                    label = f"{name}_{nfe}"
                    r = sample(root, data, recipe, ckpt, label, opts, n_samples[data], net)
                    results[name] = r
                    rows.append((recipe, nfe, name, r))
                per_budget[nfe] = min(results.items(), key=lambda kv: kv[1]["fid_train"])
            best.append((recipe, train_s, bpd, per_budget))
        print(f"\n### data={data}, {steps[data]} training steps, {n_samples[data]} samples\n")
        head = " | ".join(f"{n} NFE: FID (sampler)" for n in budgets)
        print(f"| recipe | training | test bits/dim (PF-ODE) | {head} |")
        print("|---" * (3 + len(budgets)) + "|")
        floor = None
        for recipe, train_s, bpd, per_budget in best:
            cells = []
            for nfe in budgets:
                name, r = per_budget[nfe]
                floor = r["fid_floor"]
                cells.append(f"{r['fid_test']:.2f} ({name}, {r['nfe']})")
            b = f"{bpd['bpd']:.3f} ± {bpd['bpd_stderr']:.3f}"
            print(f"| {recipe} | {train_s / 60:.1f} min | {b} | {' | '.join(cells)} |")
        print(f"\nFID floor (as many training images vs the test split): {floor:.2f}\n")
        print("| recipe | NFE budget | sampler | NFE | FID vs train (choice) | FID vs test | s |")
        print("|---|---|---|---|---|---|---|")
        for recipe, nfe, name, r in rows:
            print(
                f"| {recipe} | {nfe} | {name} | {r['nfe']} | {r['fid_train']:.2f} | "
                f"{r['fid_test']:.2f} | {r['seconds']:.0f} |"
            )


if __name__ == "__main__":
    main()
