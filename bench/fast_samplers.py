"""Benchmark the fast samplers: NFE x solver x grid x SDE on gmm8 and mix5d with their exact scores.

    python bench/fast_samplers.py [--n 4000] [--nfe 5,6,8,10,15,20] [--seed 7] [--best 3]
    python bench/fast_samplers.py --peers      # + diffusers' schedulers on the same score (VP)
    python bench/fast_samplers.py --digits [--checkpoint PATH]   # a trained digits U-Net

Each cell is first the flow error: the mean over samples of the squared distance (float64) to
the exact-score probability-flow endpoint from the same prior draw (DPM-Solver++(3M), 400 logSNR
steps, denoised), which every ODE solver approximates and which no error of one sample can cancel
in another's. Rows are ranked by it ("best at NFE"). Beside it, |delta mean exact log-density| of
the samples against 200 000 fresh draws (the goal of issue 10: <= 0.05 at NFE 10, <= 0.03 at
NFE 20; a mean that a wrong law can also meet: an over-concentrated law gains what its misplaced
samples lose), then the sliced W2 to n fresh draws. The header gives the fresh-vs-fresh floor of
the last two at the same n. NFE counts the final Tweedie
denoising: solver steps = NFE - 1 (Heun: NFE / 2 steps, even NFE only). "fast" rows use the
per-SDE defaults of samplers/fast.py (their own table; the grid column reads "shipped").

--peers and --digits each print one more section instead of the tables above (add --tables to
get both); the default run is unchanged.

--peers (needs the bench extra: pip install -e ".[bench]"): diffusers' schedulers run on the same
exact score, in this process, for the VP SDE (beta_min 0.1, beta_max 20, T = 1) through the
equivalent discrete schedule: "linear" betas from 0.1/1000 to 20/1000 over 1000 train timesteps.
A scheduler works with sigma_k = sqrt((1 - acp_k) / acp_k) (acp = its alphas_cumprod); the model
call at sigma_k evaluates the toolkit's score at the continuous time t with alpha(t)^2 = acp_k,
i.e. lambda(t) = 0.5 log(acp_k / (1 - acp_k)) = -log sigma_k, inverted by
samplers.grids.t_from_log_snr, and returns epsilon = -sigma(t) * score(x_VP, t). sigma_k is the
scheduler's own current value (sigmas[step_index]): at an integer timestep k without Karras
sigmas that is alphas_cumprod[k] exactly (checked on every call); at fractional timesteps
(Euler/LMS/Heun "linspace") or on Karras grids it is diffusers' own interpolated sigma, the one
its update uses (diffusers rounds the timestep handed to a network; an exact score needs none).
DPM/UniPC/DEIS keep x = x_VP; LMS/Euler/Heun keep x = x_VP / sqrt(acp), and their
scale_model_input (x / sqrt(sigma^2 + 1)) gives x_VP back. All start from the prior draw of the
toolkit rows (same seed), mapped into the scheduler's space, and all end at sigma = 0 (no
Tweedie step: diffusers' last update returns its data prediction). NFE = model calls counted
(Heun: 2 per step but 1 on the last, so 2N - 1; the cell says "@k" where k differs from the
column). The state is float64, but diffusers keeps its sigmas in float32 and DPM-Solver++ and
Euler cast the sample to float32 inside step(). Each peer row is checked at --check-nfe (200)
on gmm8: |delta| must be below 0.05 (printed), which proves the schedule/score mapping.

--digits: a digits score model trained with the library's own mode=train code (tasks.train,
i.e. python run.py sde=vp mode=train data=digits model=unet model.ch=16 training.steps=1000;
reused if a finished run with those settings is under --outputs-root, or --checkpoint PATH),
sampled at NFE 10 and 20 by each solver and grid and compared with a 1000-step PC sample of the
same model (reverse diffusion + Langevin, snr 0.16; cached next to the checkpoint): FID with the
classifier features of mode=eval (metrics.features.build_features, eval.features=auto), and MMD
in pixel space ([0, 1], Gaussian kernels at the median reference distance h, h/2, h/4, h/8).
The floor is a second, independent 1000-step PC set of the same size scored the same way. The
third number of a cell is the flow error: the mean squared distance (summed over pixels, in the
model's range [-1, 1]) to the probability-flow ODE's own solution from the same prior draws
(DPM-Solver++(3M), logSNR grid, NFE 200), which is what every ODE solver approximates. At 300
samples FID against the SDE reference does not separate accurate ODE solvers (the ODE limit
itself scores above some 10-NFE rows); the flow error does.
The row fast/fit is fast with grid="fit": its steps fitted to this model's own flow first
(samplers.optimise_grid.fit_schedule, 256 calibration draws of seed 0; about 35 s at 10 NFE).
With --peers as well, on a VP model (beta 0.1..20) the table gains the diffusers rows (peer:...),
run on the same U-Net from the same prior draws through the mapping of --peers.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import samplers  # noqa: E402
from data.mixtures import gmm8, mixture5d  # noqa: E402
from metrics.quality import mmd, sliced_wasserstein  # noqa: E402
from models import MixtureScore  # noqa: E402
from samplers.optimise_grid import reference  # noqa: E402
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
# (label, grid column, diffusers scheduler, its config beyond the schedule); defaults otherwise
PEERS = (
    (
        "dpm++2m",
        "linspace",
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="dpmsolver++", solver_order=2),
    ),
    (
        "dpm++2m",
        "karras",
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
    ),
    ("unipc2-bh2", "linspace", "UniPCMultistepScheduler", {}),
    ("unipc3-bh2", "linspace", "UniPCMultistepScheduler", dict(solver_order=3)),
    ("deis2", "linspace", "DEISMultistepScheduler", {}),
    ("lms4", "linspace", "LMSDiscreteScheduler", {}),
    ("lms4", "karras", "LMSDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("euler", "linspace", "EulerDiscreteScheduler", {}),
    ("heun", "linspace", "HeunDiscreteScheduler", {}),
)
VP_SPACE = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler")
# the discrete schedule equivalent to VPSDE(beta_min=0.1, beta_max=20): beta_i = beta(t_i) / 1000
DISCRETE_VP = dict(
    num_train_timesteps=1000, beta_start=0.1 / 1000, beta_end=20 / 1000, beta_schedule="linear"
)
PEER_SDE = VPSDE(beta_min=0.1, beta_max=20.0)  # the continuous SDE that DISCRETE_VP discretises
# toolkit rows printed beside the peers (label in SOLVERS or "fast", grid)
SIDE_BY_SIDE = (
    ("fast", "shipped"),
    ("dpm++2m", "uniform"),
    ("dpm++2m", "logsnr"),
    ("dpm++2m", "edm"),
    ("unipc3", "logsnr"),
)
DIGITS_SOLVERS = ("unipc", "dpm_solver3", "ipndm", "dpm_solver", "ddim", "heun")
DIGITS_GRIDS = ("logsnr", "quadratic", "edm", "uniform")


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
    p.add_argument("--peers", action="store_true", help="diffusers' schedulers on the VP SDE")
    p.add_argument("--check-nfe", type=int, default=200, help="--peers: NFE of the gmm8 check")
    p.add_argument("--digits", action="store_true", help="a trained digits model vs 1000-step PC")
    p.add_argument("--tables", action="store_true", help="with --peers/--digits: also the tables")
    p.add_argument("--checkpoint", default=None, help="--digits: this checkpoint, no training")
    p.add_argument("--outputs-root", default="outputs", help="--digits: runs and caches")
    p.add_argument("--digits-steps", type=int, default=1000)
    p.add_argument("--digits-ch", type=int, default=16)
    p.add_argument(
        "--digits-sde",
        choices=("vp", "subvp", "ve"),
        default="vp",
        help="--digits: the SDE of the trained model",
    )
    p.add_argument("--digits-n", type=int, default=300, help="--digits: samples per set")
    p.add_argument("--digits-nfe", default="10,20")
    a = p.parse_args()
    if a.checkpoint is not None and not a.digits:
        p.error("--checkpoint goes with --digits")
    torch.set_num_threads(a.threads)
    nfes = [int(v) for v in a.nfe.split(",")]
    diffusers = import_diffusers() if a.peers else None
    if a.tables or not (a.peers or a.digits):
        toolkit_tables(a, nfes)
    if a.peers:
        peer_tables(a, nfes, diffusers)
    if a.digits:
        digits_table(a, diffusers)


def law_header(law_name: str, law, n: int):
    """Fresh-data reference of a law: (mean log-density of 200 000 draws, n fresh draws)."""
    big = law.sample(200_000, torch.Generator().manual_seed(1)).double()
    fresh_ll = law.log_prob(big).mean().item()
    f1, f2 = (law.sample(n, torch.Generator().manual_seed(s)) for s in (2, 3))
    floor_ll = abs(law.log_prob(f1.double()).mean().item() - fresh_ll)
    floor_sw = sliced_wasserstein(f1, f2)
    print(
        f"\n## {law_name}: n={n}, fresh |dlogp| {floor_ll:.3f}, fresh-vs-fresh sliced W2 "
        f"{floor_sw:.3f}"
    )
    return fresh_ll, f2


CELL = 22  # printed width of a cell


def exact_flow(sde, score, x_T: torch.Tensor) -> torch.Tensor:
    """The probability-flow endpoint of each prior draw under the exact score (float64):
    DPM-Solver++(3M) on 100 x 4 logSNR steps to eps = 1e-3, then Tweedie's denoising, as every
    row ends. Its own error is orders below the rows' (its 20-NFE version is already ~1e-5)."""
    with torch.no_grad():
        end = reference(sde, score, x_T.double(), 1e-3, 100, 4)[1][-1]
        return samplers.tweedie_denoise(sde, score, end, 1e-3)


def score_cell(
    law, x: torch.Tensor, fresh_ll: float, f2: torch.Tensor, flow: torch.Tensor, note: str = ""
) -> tuple[float, float, str]:
    """(flow error, |delta mean exact log-density|, the printed cell: both, the sliced W2, then
    `note`). flow: the exact flow endpoints of the same prior draws."""
    err = (x.double() - flow).square().sum(1).mean().item()
    err = err if err == err else float("inf")
    d = abs(law.log_prob(x.double()).mean().item() - fresh_ll)
    d = d if d == d else float("inf")
    sw = sliced_wasserstein(x.float(), f2) if d < 1e3 else float("inf")
    cell = f"{min(err, 99):7.1e} {min(d, 99.99):5.3f} {min(sw, 9.99):5.3f} {note:3s}"
    return err, d, cell


def toolkit_row(sde, score, law, sampler, options, grid, nfe, x_T, fresh_ll, f2, flow):
    steps = steps_for(sampler, nfe)
    if steps is None or steps < 1:
        return None, f"{'-':{CELL}s}"
    opts = dict(options) if grid == "shipped" else dict(options, grid=grid)
    x, _ = samplers.sample(sde, score, tuple(x_T.shape), sampler, steps, x_T=x_T.clone(), **opts)
    err, _, cell = score_cell(law, x, fresh_ll, f2, flow)
    return err, cell


def prior_draw(sde, law, n: int, seed: int) -> torch.Tensor:
    """The rows' shared prior draw (what samplers.sample draws with a generator of this seed)."""
    return sde.prior_sampling((n, law.dim), generator=torch.Generator().manual_seed(seed))


def toolkit_tables(a, nfes: list[int]) -> None:
    for law_name, make in LAWS.items():
        law = make()
        fresh_ll, f2 = law_header(law_name, law, a.n)
        for sde_name, cls in SDES.items():
            sde = cls()
            score = MixtureScore(sde, law)
            rows = [("fast", "fast", {}, "shipped")]
            rows += [
                (label, s, o, g)
                for label, (s, o) in SOLVERS.items()
                for g in samplers.GRIDS
                if not (s == "ddim" and sde_name == "ve")
            ]
            print(
                f"\n{sde_name:6s} {'solver':13s} {'grid':9s} "
                + " ".join(f"NFE {n:<{CELL - 4}d}" for n in nfes)
            )
            table = {}
            x_T = prior_draw(sde, law, a.n, a.seed)
            flow = exact_flow(sde, score, x_T)
            for label, sampler, options, grid in rows:
                cells = []
                for nfe in nfes:
                    err, cell = toolkit_row(
                        sde, score, law, sampler, options, grid, nfe, x_T, fresh_ll, f2, flow
                    )
                    if err is not None:
                        table[(label, grid, nfe)] = err
                    cells.append(cell)
                print(f"{'':6s} {label:13s} {grid:9s} " + " ".join(cells), flush=True)
            for nfe in nfes:
                best = sorted((v, k[0], k[1]) for k, v in table.items() if k[2] == nfe)
                print(
                    f"{'':6s} closest to the exact flow at NFE {nfe}: "
                    + ", ".join(f"{s}/{g} {v:.2e}" for v, s, g in best[: a.best])
                )


# ---------------------------------------------------------------------------- --peers (diffusers)


def import_diffusers():
    try:
        import diffusers
    except ImportError:
        sys.exit('--peers needs the diffusers library: pip install -e ".[bench]"')
    return diffusers


class DiscreteVPModel:
    """The toolkit's exact score as diffusers' epsilon model on the equivalent discrete schedule.

    `eps(x_vp, ratio)` is epsilon at the scheduler's sigma_k = ratio = sqrt((1 - acp) / acp):
    the toolkit's score at the time t with lambda(t) = -log ratio (alpha(t)^2 = acp), times
    -sigma(t). Times are found once per distinct ratio (float64 bisection) and cached.
    """

    def __init__(self, sde, score_fn) -> None:
        self.sde, self.score_fn, self.cache, self.calls = sde, score_fn, {}, 0

    def time_of(self, ratio: float) -> tuple[float, float]:
        if ratio not in self.cache:
            lam = torch.tensor([-math.log(ratio)], dtype=torch.float64)
            # acp_999 lies a little beyond t = T (t = 1.006): bisect on a wider bracket
            t = samplers.grids.t_from_log_snr(self.sde, lam, 2.0 * self.sde.T, 1e-9)
            _, sigma = self.sde.alpha_sigma(t)
            self.cache[ratio] = (t.item(), sigma.item())
        return self.cache[ratio]

    def eps(self, x_vp: torch.Tensor, ratio: float) -> torch.Tensor:
        t, sigma = self.time_of(ratio)
        self.calls += 1
        return -sigma * self.score_fn(x_vp, x_vp.new_full((x_vp.shape[0],), t))


def run_peer(
    diffusers, sde, score_fn, x_T: torch.Tensor, cls_name: str, config: dict, steps: int
) -> tuple[torch.Tensor, int]:
    """Sample with a diffusers scheduler from the toolkit's prior draw x_T (x_VP at t ~ T):
    returns (x_0 in float64, model calls made)."""
    sched = getattr(diffusers, cls_name)(**DISCRETE_VP, **config)
    sched.set_timesteps(steps)
    acp = sched.alphas_cumprod.double()
    sigmas = sched.sigmas.double()
    karras = bool(config.get("use_karras_sigmas"))
    vp_space = cls_name in VP_SPACE
    model = DiscreteVPModel(sde, score_fn)
    x = x_T.double() * (1.0 if vp_space else math.sqrt(1.0 + float(sigmas[0]) ** 2))
    for timestep in sched.timesteps:
        i = sched.step_index if sched.step_index is not None else 0
        x_in = sched.scale_model_input(x, timestep)
        ratio = float(sigmas[i])
        # the schedule mapping, checked on every call where diffusers has a discrete acp_k
        scale = 1.0 if vp_space else 1.0 / math.sqrt(1.0 + ratio**2)
        if not torch.allclose(x_in, x * scale, rtol=1e-6, atol=0.0):
            raise RuntimeError(f"{cls_name}: scale_model_input is not x / {1 / scale:.6g}")
        k = float(timestep)
        if not karras and k.is_integer():
            want = math.sqrt((1 - float(acp[int(k)])) / float(acp[int(k)]))
            if abs(ratio / want - 1) > 1e-6:
                raise RuntimeError(f"{cls_name}: sigma {ratio} at timestep {k} != acp's {want}")
        eps = model.eps(x_in, ratio)
        x = sched.step(eps, timestep, x).prev_sample
    return x, model.calls


def peer_steps(cls_name: str, nfe: int) -> int:
    """Scheduler steps for an NFE budget: Heun makes 2N - 1 model calls, the others N."""
    return (nfe + 1) // 2 if cls_name == "HeunDiscreteScheduler" else nfe


def peer_tables(a, nfes: list[int], diffusers) -> None:
    sde = PEER_SDE
    print(
        f"\n# peers: diffusers {diffusers.__version__} schedulers on the exact score, vp SDE "
        f"(linear betas {DISCRETE_VP['beta_start']:g}..{DISCRETE_VP['beta_end']:g}, 1000 "
        f"timesteps), float64 state; rows marked * are the toolkit's own"
    )
    checks = []
    for law_name, make in LAWS.items():
        law = make()
        score = MixtureScore(sde, law)
        fresh_ll, f2 = law_header(law_name, law, a.n)
        # the toolkit rows' prior draw (the same seed), shared by every peer run of this law
        x_T = prior_draw(sde, law, a.n, a.seed)
        flow = exact_flow(sde, score, x_T)
        print(
            f"\n{'vp':6s} {'solver':13s} {'grid':9s} "
            + " ".join(f"NFE {n:<{CELL - 4}d}" for n in nfes)
        )
        for label, grid in SIDE_BY_SIDE:
            sampler, options = ("fast", {}) if label == "fast" else SOLVERS[label]
            cells = [
                toolkit_row(sde, score, law, sampler, options, grid, nfe, x_T, fresh_ll, f2, flow)[
                    1
                ]
                for nfe in nfes
            ]
            print(f"{'*':6s} {label:13s} {grid:9s} " + " ".join(cells), flush=True)
        for label, grid, cls_name, config in PEERS:
            cells = []
            for nfe in nfes:
                x, calls = run_peer(
                    diffusers, sde, score, x_T, cls_name, config, peer_steps(cls_name, nfe)
                )
                note = "" if calls == nfe else f"@{calls}"
                cells.append(score_cell(law, x, fresh_ll, f2, flow, note)[2])
            print(f"{'':6s} {label:13s} {grid:9s} " + " ".join(cells), flush=True)
            if law_name == "gmm8":
                x, calls = run_peer(
                    diffusers, sde, score, x_T, cls_name, config, peer_steps(cls_name, a.check_nfe)
                )
                _, d, _ = score_cell(law, x, fresh_ll, f2, flow)
                checks.append((label, grid, calls, d))
    print(
        f"\ncheck of the score/schedule mapping: each peer at NFE ~{a.check_nfe} on gmm8 "
        "(|delta| < 0.05 required)"
    )
    for label, grid, calls, d in checks:
        print(
            f"  {label:13s} {grid:9s} NFE {calls:4d}: |delta| {d:.4f} "
            f"{'ok' if d < 0.05 else 'FAIL'}"
        )
    if any(d >= 0.05 for *_, d in checks):
        sys.exit("a peer row failed its high-NFE check: the mapping to diffusers is wrong")


# ------------------------------------------------------------------------ --digits (trained model)


def digits_config(a) -> dict:
    """The run config of python run.py sde=<--digits-sde> mode=train data=digits, smaller, as a
    plain dict."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides = [
        "mode=train",
        f"sde={a.digits_sde}",
        "data=digits",
        "model=unet",
        f"model.ch={a.digits_ch}",
        f"training.steps={a.digits_steps}",
        f"outputs_root={a.outputs_root}",
        "logger.mode=disabled",
        "progress=false",
        "device=cpu",
    ]
    conf = Path(__file__).resolve().parents[1] / "conf"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=True)


def digits_model(a, cfg: dict):
    """(sde, dataset, model, checkpoint path): --checkpoint, else a finished run with the same
    settings under outputs_root, else trained now with tasks.train.run_train."""
    from tasks.common import load_score_model, matching_runs
    from tasks.train import run_train
    from training import checkpoint as ckpt

    path = a.checkpoint
    if path is None:
        runs = [
            r
            for r in matching_runs(cfg)
            if r["model_match"] and r["status"] == "finished" and r["planned"] == a.digits_steps
        ]
        for run in sorted(runs, key=lambda r: r["mtime"], reverse=True):
            found = ckpt.latest_valid(run["dir"] / "checkpoints")
            if found:
                path = found[0]
                print(f"reusing {path} (a finished run with these settings)")
                break
    if path is None:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        out_dir = Path(a.outputs_root) / "train" / f"{stamp}-bench_vp_digits"
        print(
            f"training: python run.py sde=vp mode=train data=digits model=unet "
            f"model.ch={a.digits_ch} training.steps={a.digits_steps} (into {out_dir})",
            flush=True,
        )
        t0 = time.perf_counter()
        summary = run_train(cfg, out_dir)
        path = summary["checkpoint"]
        print(
            f"trained in {time.perf_counter() - t0:.0f} s: loss {summary['final_loss']:.4g}, "
            f"{path}",
            flush=True,
        )
    sde, dataset, model, path = load_score_model({**cfg, "ckpt": str(path)})
    return sde, dataset, model, Path(path)


def digits_table(a, diffusers=None) -> None:
    from metrics.features import build_features
    from metrics.fid import fid_from_features
    from metrics.images import dataset_uint8
    from tasks.common import UserError
    from tasks.sample import sample_noise, to_images

    t_start = time.perf_counter()
    cfg = digits_config(a)
    try:
        sde, dataset, model, path = digits_model(a, cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    n = a.digits_n

    def draw(sampler: str, steps: int, seed: int, first: int = 0, **options):
        """Samples first .. first + n - 1 (keyed noise) in the model's range, and the NFE."""
        idx = torch.arange(first, first + n)
        x, nfe = samplers.sample(
            sde,
            model,
            (n, *dataset.shape),
            sampler,
            steps,
            generator=sample_noise(seed, idx),
            **options,
        )
        return torch.nan_to_num(x, nan=dataset.model_range[0]), nfe

    # the reference (samples 0 .. n-1) and a second PC set (n .. 2n-1) for the floor at n vs n
    ref_seed = a.seed + 1
    pc_sets = []
    for part in (0, 1):
        cache = path.parent / f"bench-pc1000-n{n}-seed{ref_seed}-part{part}.pt"
        if cache.is_file():
            saved = torch.load(cache, weights_only=True)
            pc_sets.append((saved["images"].numpy(), int(saved["nfe"])))
            print(f"1000-step PC set {part} read from {cache}")
            continue
        t0 = time.perf_counter()
        x, nfe = draw("pc", 1000, ref_seed, first=part * n)
        u8 = to_images(dataset, x)
        torch.save({"images": torch.from_numpy(u8), "nfe": nfe}, cache)
        pc_sets.append((u8, nfe))
        print(
            f"1000-step PC set {part}: {n} samples, NFE {nfe}, {time.perf_counter() - t0:.0f} s "
            f"(cached in {cache})",
            flush=True,
        )
    (ref, ref_nfe), (second, _) = pc_sets
    train_u8, test_u8 = dataset_uint8(dataset, "train"), dataset_uint8(dataset, "test")
    feats = build_features(dataset, train_u8, test_u8, cfg)
    f_ref, f_test = feats(ref), feats(test_u8)
    pix_ref = torch.from_numpy(ref).double().flatten(1) / 255
    h = torch.pdist(pix_ref).median().item()  # MMD bandwidth: the median reference distance

    def scores(u8) -> tuple[float, float]:
        pix = torch.from_numpy(u8).double().flatten(1) / 255
        return fid_from_features(feats(u8), f_ref), mmd(pix, pix_ref, bandwidth=h)

    fid_floor, mmd_floor = scores(second)
    fid_test = fid_from_features(f_ref, f_test)
    nfes = [int(v) for v in a.digits_nfe.split(",")]
    # the probability-flow ODE's own solution from the same prior draws (the ODE samplers use no
    # other noise): what every ODE solver approximates, so its distance is their accuracy
    x_ode, used = draw("dpm_solver3", 199, a.seed, grid="logsnr")
    fid_ode, mmd_ode = scores(to_images(dataset, x_ode))
    print(
        f"\n## digits: {path}; {n} samples per set (seed {a.seed}); reference: {n} samples of "
        f"1000-step PC (reverse diffusion + Langevin, snr 0.16, NFE {ref_nfe}, seed {ref_seed})"
        f"; features: {feats.name} (test accuracy {feats.accuracy:.3f})"
    )
    print(
        f"FID to the PC reference, then pixel MMD (bandwidth {h:.3f}); floor (a second "
        f"1000-step PC set of {n}, samples {n}..{2 * n - 1}): FID {fid_floor:.2f}, MMD "
        f"{mmd_floor:.4f}; PC reference vs the {len(test_u8)} test digits: FID "
        f"{fid_test:.2f}"
    )
    print(
        f"ODE limit (dpm_solver3, logsnr, NFE {used}): FID {fid_ode:.2f}, MMD {mmd_ode:.4f}. "
        "Each cell: FID, MMD, and the flow error: the mean over samples of the squared distance "
        "(summed over pixels, model range) to that ODE solution from the same prior draw"
    )
    print(f"\n{'solver':13s} {'grid':9s} " + " ".join(f"NFE {v:<20d}" for v in nfes))
    # fast/fit: grid="fit", the steps fitted to this model's flow first (256 calibration draws,
    # seed 0, not the samples scored; the fit's own evaluations are not in the NFE)
    rows = [("fast", "auto"), ("fast", "fit")] + [
        (s, g)
        for s in DIGITS_SOLVERS
        for g in DIGITS_GRIDS
        if not (s == "ddim" and a.digits_sde == "ve")
    ]
    table, flow = {}, {}

    def cell(key: tuple, x: torch.Tensor, used: int) -> str:
        """Score samples x (model range) of row key = (sampler, grid, nfe): record FID and flow
        error, return the printed cell."""
        fid, m = scores(to_images(dataset, x))
        err = (x - x_ode).double().square().flatten(1).sum(1).mean().item()
        table[key], flow[key] = fid, err
        at = "" if used == key[2] else f"@{used}"
        return f"{fid:6.2f} {m:.4f} {err:6.3f} {at:3s}"

    for sampler, grid in rows:
        cells = []
        for nfe in nfes:
            steps = steps_for(sampler, nfe)
            if steps is None or steps < 1:
                cells.append(f"{'-':24s}")
                continue
            opts = {} if grid == "auto" else {"grid": grid}
            x, used = draw(sampler, steps, a.seed, **opts)
            cells.append(cell((sampler, grid, nfe), x, used))
        print(f"{sampler:13s} {grid:9s} " + " ".join(cells), flush=True)
    if diffusers is not None and repr(sde) != repr(PEER_SDE):
        print(
            f"(no diffusers rows: the model's SDE is {sde!r}; the mapping of --peers is for "
            f"{PEER_SDE!r})"
        )
    elif diffusers is not None:  # --peers: diffusers on the same model, same prior draws
        x_T = sde.prior_sampling(
            (n, *dataset.shape), generator=sample_noise(a.seed, torch.arange(n))
        )

        def score64(x, t):  # the float32 U-Net on diffusers' float64 state
            return model(x.float(), t.float()).double()

        for label, grid, cls_name, config in PEERS:
            cells = []
            for nfe in nfes:
                with torch.no_grad():
                    x, calls = run_peer(
                        diffusers, sde, score64, x_T, cls_name, config, peer_steps(cls_name, nfe)
                    )
                x = torch.nan_to_num(x.float(), nan=dataset.model_range[0])
                cells.append(cell((f"peer:{label}", grid, nfe), x, calls))
            print(f"{'peer:' + label:13s} {grid:9s} " + " ".join(cells), flush=True)
    for nfe in nfes:
        for what, values, fmt in (("FID", table, ".2f"), ("flow error", flow, ".3f")):
            best = sorted((v, k[0], k[1]) for k, v in values.items() if k[2] == nfe)
            print(
                f"best {what} at NFE {nfe}: "
                + ", ".join(f"{s}/{g} {v:{fmt}}" for v, s, g in best[: a.best])
            )
    print(f"--digits took {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
