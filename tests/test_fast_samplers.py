"""Fast samplers: DPM-Solver++(3M), UniPC, iPNDM, the time grids and schedule files, `fast`.

Convergence orders are measured on a diagonal Gaussian law N(mu, diag(c)) (c = 0.1, 0.3, 1, 3),
where the probability-flow map is known in closed form,
  x_s = alpha_s mu + sqrt((alpha_s^2 c + sigma_s^2) / (alpha_t^2 c + sigma_t^2)) (x_t - alpha_t mu)
as the least-squares log-log slope of the error (rms over 16 points, worst coordinate) against the
number of steps. Quality is the gap of the mean exact log-density of the samples to that of fresh
data, as in issue 10.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from closed_form import exact_score, gmm8, make_sde, mixture5d
from runs import run_mode

import samplers
from models.exact import GaussianMixture
from sde_lib import VESDE

torch.set_num_threads(1)

VAR = torch.tensor([0.1, 0.3, 1.0, 3.0], dtype=torch.float64)
MU = torch.tensor([0.7, -1.2, 0.3, 0.0], dtype=torch.float64)


def flow_error(sde, sampler, steps, eps, grid, **options):
    """Worst-coordinate rms error of `sampler` against the exact flow map from T to eps."""
    law = GaussianMixture([1.0], MU[None], VAR[None])
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x * sde.prior_std()
    a, s = sde.alpha_sigma(torch.tensor([sde.T, eps], dtype=torch.float64))
    exact = a[1] * MU + ((a[1] ** 2 * VAR + s[1] ** 2) / (a[0] ** 2 * VAR + s[0] ** 2)).sqrt() * (
        x - a[0] * MU
    )
    ts = grid(sde, steps, eps) if callable(grid) else grid
    y = samplers.SAMPLERS[sampler](
        sde, exact_score(sde, law), x.clone(), steps=steps, eps=eps, grid=ts, **options
    )
    return (y - exact).square().mean(0).sqrt().max().item()


def slope(ns, errors):
    lx, ly = torch.tensor(ns).double().log(), torch.tensor(errors).log()
    return -(((lx - lx.mean()) * (ly - ly.mean())).sum() / (lx - lx.mean()).square().sum()).item()


EPS = {"vp": 0.2, "subvp": 0.2, "ve": 0.3}  # end inside the law's transition, so the rate shows
NS = [16, 32, 64, 128]


# (sampler, options, stated order); all with lower_order_final=False on the logSNR grid
ORDERS = [
    ("dpm_solver3", {}, 3),
    ("unipc", dict(order=1), 2),
    ("unipc", dict(order=2), 3),
    ("unipc", dict(order=3), 4),
    ("unipc", dict(order=3, variant="bh1"), 4),
    ("unipc", dict(order=3, use_corrector=False), 3),
]


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize(("sampler", "options", "order"), ORDERS)
def test_exponential_solvers_converge_at_their_order(sde_name, sampler, options, order):
    """Measured slopes 2.9-4.3; tolerance -0.3 / +0.6 around the stated order."""
    sde = make_sde(sde_name)
    errors = [
        flow_error(sde, sampler, n, EPS[sde_name], "logsnr", lower_order_final=False, **options)
        for n in NS
    ]
    assert order - 0.3 <= slope(NS, errors) <= order + 0.6, errors
    assert errors[-1] < 1e-3 * 10 ** (2 - order)


@pytest.mark.parametrize(("order", "lowest"), [(2, 1.7), (3, 2.65), (4, 3.2)])
def test_ipndm_converges_at_its_order_on_a_sigma_uniform_grid(order, lowest):
    """iPNDM's fixed coefficients are those of equal steps in sigma / alpha (EDM, rho = 1).

    Measured slopes 1.95 / 2.76 / 3.46 over 32-256 steps: orders 2 and 3 as stated; order 4 sits
    between 3 and 4 at these step counts because its first (Euler) warm-up step has a local error
    of O(h^2). Bounds: `lowest` to order + 0.6.
    """
    sde = VESDE(sigma_min=0.1, sigma_max=10.0)
    ns = [32, 64, 128, 256]

    def grid(sde, n, eps):
        return samplers.edm_grid(sde, n, eps, rho=1.0)

    errors = [
        flow_error(sde, "ipndm", n, 0.5, grid, order=order, lower_order_final=False) for n in ns
    ]
    assert lowest <= slope(ns, errors) <= order + 0.6, errors


def test_ipndm_is_second_order_on_other_grids():
    sde = make_sde("vp")
    errors = [flow_error(sde, "ipndm", n, 0.2, "logsnr", lower_order_final=False) for n in NS]
    assert 1.7 <= slope(NS, errors) <= 2.6, errors


def test_unipc2_bh2_predictor_is_dpm_solver_2m():
    """UniP-2 with B(h) = e^h - 1 and a_1 = 1/2 is exactly DPM-Solver++(2M)."""
    sde, law = make_sde("vp"), gmm8()
    x = sde.prior_sampling((64, 2), generator=torch.Generator().manual_seed(0)).double()
    score = exact_score(sde, law)
    a = samplers.sample_unipc(
        sde, score, x, steps=12, order=2, use_corrector=False, lower_order_final=False
    )
    b = samplers.sample_dpm_solver(sde, score, x, steps=12)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- NFE and options


@pytest.mark.parametrize(
    ("sampler", "steps", "options", "nfe"),
    [
        ("dpm_solver3", 9, {}, 10),
        ("dpm_solver3", 9, dict(denoise=False), 9),
        ("unipc", 9, {}, 10),
        ("unipc", 9, dict(use_corrector=False, order=1), 10),
        ("ipndm", 9, {}, 10),
        ("ipndm", 1, dict(denoise=False), 1),
        ("fast", 9, {}, 10),
        ("fast", 19, {}, 20),
        ("fast", 4, dict(denoise=False), 4),
    ],
)
def test_nfe_is_steps_plus_the_denoising(sampler, steps, options, nfe):
    sde = make_sde("vp")
    x, count = samplers.sample(sde, exact_score(sde, gmm8()), (16, 2), sampler, steps, **options)
    assert count == nfe and torch.isfinite(x).all()


def test_fast_final_step_spends_the_denoising_evaluation_on_a_solver_step():
    """Sub-VP at 9 steps (FINAL_STEP): 10 NFE, exactly iPNDM's 10 steps on the shipped final-step
    schedule without denoising; denoise=False or an explicit grid: the plain 9-step path (plus
    Tweedie's denoising for the grid), as for every other entry."""
    from samplers.fast import entry
    from samplers.grids import schedule_times

    sde, law = make_sde("subvp"), gmm8()
    score = exact_score(sde, law)
    x_T = sde.prior_sampling((64, 2), generator=torch.Generator().manual_seed(3)).double()
    final = entry(sde, 9)["final_step"]
    solver, options, positions = final["solver"], final["options"], final["positions"]
    assert (solver, options) == ("ipndm", dict(order=3, lower_order_final=False))
    assert len(positions) == 11
    times = schedule_times(sde, positions, 1e-3)
    h = samplers.grids.log_snr(sde, times).diff()
    bound = final["fit"]["max_step_ratio"]
    assert float(torch.maximum(h[1:] / h[:-1], h[:-1] / h[1:]).max()) <= bound * 1.001
    x, nfe = samplers.sample(sde, score, x_T.shape, "fast", 9, x_T=x_T.clone())
    want = samplers.SAMPLERS[solver](sde, score, x_T.clone(), steps=10, grid=times, **options)
    assert nfe == 10
    torch.testing.assert_close(x, want, rtol=0, atol=1e-12)
    _, nfe = samplers.sample(sde, score, x_T.shape, "fast", 9, x_T=x_T.clone(), denoise=False)
    assert nfe == 9
    x, nfe = samplers.sample(sde, score, x_T.shape, "fast", 9, x_T=x_T.clone(), grid="edm")
    plain = samplers.sample(
        sde, score, x_T.shape, "fast", 9, x_T=x_T.clone(), grid="edm", denoise=False
    )[0]
    assert nfe == 10
    torch.testing.assert_close(x, samplers.tweedie_denoise(sde, score, plain, 1e-3))
    assert "final_step" not in entry(make_sde("vp"), 9) and "final_step" not in entry(sde, 19)


@pytest.mark.parametrize(
    ("sampler", "options", "match"),
    [
        (
            "dpm_solver3",
            dict(order=4),
            r"order=4 is not allowed; allowed: an integer >= 1 and <= 3",
        ),
        (
            "dpm_solver3",
            dict(lower_order_final="yes"),
            r"lower_order_final='yes' is not allowed; allowed: True, False",
        ),
        ("unipc", dict(variant="bh3"), r"variant='bh3' is not allowed; allowed: bh1, bh2"),
        ("unipc", dict(order=0), r"order=0 is not allowed; allowed: an integer >= 1 and <= 3"),
        ("unipc", dict(use_corrector=1), r"use_corrector=1 is not allowed; allowed: True, False"),
        ("ipndm", dict(order=5), r"order=5 is not allowed; allowed: an integer >= 1 and <= 4"),
        ("ipndm", dict(grid="cosine"), r"unknown grid 'cosine'; allowed: uniform, logsnr, edm, q"),
        ("fast", dict(solver="rk4"), r"solver='rk4' is not allowed; allowed: auto, unipc, ipndm"),
        ("unipc", dict(beta=1), r"beta is not an option of sampler unipc; allowed: grid, "),
    ],
)
def test_bad_options_raise_one_line(sampler, options, match):
    sde = make_sde("vp")
    with pytest.raises(ValueError, match=match) as err:
        samplers.sample(sde, exact_score(sde, gmm8()), (4, 2), sampler, **options)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["dpm_solver3", "unipc", "ipndm", "fast"])
def test_each_new_sampler_runs_from_run_py(tmp_path, name):
    m, _ = run_mode(
        tmp_path,
        name,
        "mode=sample",
        "model=exact",
        "data=gmm8",
        f"sampler={name}",
        "sampler.steps=9",
        "sampler.n_samples=2000",
        "sampler.batch_size=2000",
    )
    assert m["sampler"] == name and m["nfe"] == 10
    gap = abs(m["exact_loglik_mean"] - m["exact_loglik_mean_fresh_data"])
    assert gap < 0.5, gap


def test_bad_new_option_from_run_py_is_refused(tmp_path):
    from tasks import UserError

    with pytest.raises(UserError, match="sampler.variant='x' is not allowed; allowed: bh1, bh2"):
        run_mode(
            tmp_path,
            "bad",
            "mode=sample",
            "model=exact",
            "sampler=unipc",
            "sampler.variant=x",
            "sampler.n_samples=10",
        )


# ---------------------------------------------------------------- grids and schedule files


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_quadratic_grid_is_uniform_in_sqrt_t(sde_name):
    sde = make_sde(sde_name)
    ts = samplers.get_grid("quadratic", sde, 10, 1e-3)
    assert ts[0].item() == sde.T and ts[-1].item() == 1e-3 and (ts.diff() < 0).all()
    root = ts.sqrt().diff()
    torch.testing.assert_close(root, root.mean().expand(10), rtol=1e-9, atol=1e-12)


def _write(path, times):
    path.write_text(json.dumps({"times": times}))
    return str(path)


@pytest.mark.parametrize(
    ("content", "steps", "match"),
    [
        (None, 3, r"grid file '.*missing\.json' does not exist"),
        ("{not json", 3, r"is not a readable JSON schedule"),
        ('{"t": [1, 0.001]}', 3, r"need a JSON object with a list 'times'"),
        ([1.0, 0.5, 0.001], 3, r"has 2 steps \(3 times\) but steps=3; set steps=2"),
        ([1.0, 0.2, 0.5, 0.001], 3, r"must decrease strictly from T to eps; t\[1\]=0\.2"),
        ([0.9, 0.5, 0.2, 0.001], 3, r"must run from T=1\.0 to eps=0\.001"),
        ([1.0, 0.5, 0.2, 0.01], 3, r"must run from T=1\.0 to eps=0\.001"),
        ([1.0, 0.5, "a", 0.001], 3, r"the times must be a list of numbers"),
    ],
)
def test_bad_schedule_files_raise_clear_errors(tmp_path, content, steps, match):
    sde = make_sde("vp")
    path = tmp_path / "missing.json"
    if content is not None:
        path = tmp_path / "s.json"
        path.write_text(content if isinstance(content, str) else json.dumps({"times": content}))
    with pytest.raises(ValueError, match=match):
        samplers.sample(sde, exact_score(sde, gmm8()), (4, 2), "unipc", steps, grid=str(path))


def test_schedule_file_is_used_by_every_grid_option(tmp_path):
    sde = make_sde("vp")
    ts = samplers.get_grid("edm", sde, 6, 1e-3)
    path = samplers.save_schedule(tmp_path / "s.json", ts, note="edm")
    torch.testing.assert_close(samplers.get_grid(str(path), sde, 6, 1e-3), ts, rtol=0, atol=1e-15)
    score = exact_score(sde, gmm8())
    x = sde.prior_sampling((32, 2), generator=torch.Generator().manual_seed(0))
    for name in ("dpm_solver", "dpm_solver3", "unipc", "ipndm", "ddim", "heun", "em"):
        a, _ = samplers.sample(
            sde,
            score,
            (32, 2),
            name,
            6,
            x_T=x,
            grid=str(path),
            generator=torch.Generator().manual_seed(1),
        )
        b, _ = samplers.sample(
            sde,
            score,
            (32, 2),
            name,
            6,
            x_T=x,
            grid="edm",
            generator=torch.Generator().manual_seed(1),
        )
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- quality of the defaults

LAWS = {"gmm8": gmm8, "mix5d": mixture5d}


def fresh_loglik(law_name):
    """Mean exact log-density of 200 000 fresh draws (its standard error is below 0.004)."""
    law = LAWS[law_name]()
    return law.log_prob(law.sample(200_000, torch.Generator().manual_seed(1)).double()).mean()


def gap(sde_name, law_name, sampler, steps, seed=7, n=4000, **options):
    sde, law = make_sde(sde_name), LAWS[law_name]()
    g = torch.Generator().manual_seed(seed)
    x, nfe = samplers.sample(
        sde, exact_score(sde, law), (n, law.dim), sampler, steps, generator=g, **options
    )
    return (law.log_prob(x.double()).mean() - fresh_loglik(law_name)).item(), nfe


# |gap| measured with n = 4000 at seed 7 (docs/fast-sampling.md); the sampling noise of the
# mean alone is about 0.016 (gmm8) / 0.025 (mix5d), so the bounds are the goal where it is met.
# gmm8 on VP and both sub-VP laws are measured at n = 20 000 (noise 0.007 / 0.011), with the
# gap-constrained 19-step schedules fitted with two trained models per kind, three for VP
# (tasks.fast_refit.refit): VP gmm8 0.017 / 0.002 (seeds 7 / 8; -0.005 / -0.005 at n = 4000), VP
# mix5d -0.000 / 0.010 at n = 4000 (-0.011 / -0.009 at n = 20 000; iPNDM since 2026-12-03).
FAST_20 = [
    ("vp", "gmm8", 20_000),
    ("vp", "mix5d", 4000),
    ("ve", "gmm8", 4000),
    ("ve", "mix5d", 4000),
    ("subvp", "mix5d", 20_000),
    ("subvp", "gmm8", 20_000),
]


@pytest.mark.parametrize(("sde_name", "law_name", "n"), FAST_20)
def test_fast_at_20_nfe(sde_name, law_name, n):
    value, nfe = gap(sde_name, law_name, "fast", 19, n=n)
    assert nfe == 20 and abs(value) <= 0.03, value


@pytest.mark.parametrize("law_name", ["gmm8", "mix5d"])
def test_fast_vp_at_15_nfe_is_held_to_the_mixtures_too(law_name):
    """VP's 14-step entry is gap-constrained as well (iPNDM, fitted to three VP U-Nets): measured
    at n = 20 000, seeds 7 / 8, gmm8 0.016 / 0.001 and mix5d -0.008 / -0.008, where the former
    UniPC-3 entry was at -0.011 / -0.026 and -0.075 / -0.071 (worse than at 10 NFE)."""
    value, nfe = gap("vp", law_name, "fast", 14, n=20_000)
    assert nfe == 15 and abs(value) <= 0.03, value


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("law_name", ["gmm8", "mix5d"])
def test_fast_at_10_nfe(sde_name, law_name):
    """Issue 10's goal at 10 NFE, |gap| <= 0.05, at n = 20 000 (sampling noise 0.007 / 0.011):
    measured at seed 7 (8): VP 0.014 (-0.004) on gmm8, 0.003 (0.010) on mix5d (UniPC-2 since
    2026-12-03); sub-VP -0.007
    (-0.030), -0.015 (-0.015) (10 iPNDM steps, no denoising: FINAL_STEP); VE -0.004 (-0.020),
    -0.022 (-0.028), with the gap-constrained schedules (tasks.fast_refit.gap_constrained_fit,
    fitted to two trained models per kind),
    against 0.40-1.49 for DPM-Solver++(2M) on the logSNR grid, the former default (at n = 4000),
    so also at least eight times better."""
    value, nfe = gap(sde_name, law_name, "fast", 9, n=20_000)
    old, _ = gap(sde_name, law_name, "dpm_solver", 9)
    assert nfe == 10 and abs(value) <= 0.05 and abs(value) * 8 <= abs(old), (value, old)


# each sample's squared distance to the exact-score flow endpoint from the same prior draw,
# averaged: fast at 10 / 15 / 20 NFE, measured at n = 2000, seed 9 (docs/fast-sampling.md)
FAST_FLOW = {
    ("vp", "gmm8"): (1.31e-2, 9.14e-5, 5.07e-5),
    ("subvp", "gmm8"): (6.48e-3, 1.92e-4, 9.97e-5),
    ("ve", "gmm8"): (2.32e-3, 2.16e-4, 1.14e-4),
    ("vp", "mix5d"): (2.47e-2, 3.98e-3, 2.99e-3),
    ("subvp", "mix5d"): (5.07e-3, 2.59e-3, 2.43e-4),
    ("ve", "mix5d"): (3.30e-2, 9.04e-4, 9.82e-4),
}


@pytest.mark.parametrize(("sde_name", "law_name"), list(FAST_FLOW))
def test_fast_is_closer_to_the_exact_flow_than_the_former_default(sde_name, law_name):
    """The measure that cannot cancel beside the log-density gaps above: the mean over samples of
    the squared distance to the exact flow's endpoint (DPM-Solver++(3M), 200 logSNR steps,
    within 1e-7 of 400) from the same 2000 prior draws. At 10, 15 and 20 NFE fast is within
    1.5x of its measured value and closer than DPM-Solver++(2M) on the logSNR grid, the default
    before it (1.2-23x closer as measured; at 20 NFE on VP mix5d only 1.2x, and on 1000 other
    draws level with it)."""
    from samplers.optimise_grid import reference

    sde, law = make_sde(sde_name), LAWS[law_name]()
    score = exact_score(sde, law)
    x_T = sde.prior_sampling((2000, law.dim), generator=torch.Generator().manual_seed(9)).double()
    flow = samplers.tweedie_denoise(
        sde, score, reference(sde, score, x_T, 1e-3, 100, 2)[1][-1], 1e-3
    )

    def error(sampler, steps):
        x, _ = samplers.sample(sde, score, x_T.shape, sampler, steps, x_T=x_T.clone())
        return (x - flow).square().sum(1).mean().item()

    for steps, measured in zip((9, 14, 19), FAST_FLOW[(sde_name, law_name)], strict=True):
        fast, former = error("fast", steps), error("dpm_solver", steps)
        assert fast <= 1.5 * measured and fast < former, (steps + 1, fast, measured, former)


def test_ddim_default_grid_is_the_measured_best_and_not_the_worst():
    """DDIM, 50 steps, VP: the default (time-quadratic) grid is within 0.05 on gmm8 and beats the
    former uniform-t default on both laws (mix5d: 0.11 against 0.32); and, by the measure that
    cannot cancel, it is the closest of the four grids to the exact flow's endpoints from the
    same 2000 prior draws (gmm8 4.1e-4 against 7.3e-4 for uniform-t, mix5d 4.5e-3 against
    6.0e-3; logSNR and EDM 1.6-3.5x further)."""
    from samplers.optimise_grid import reference

    assert samplers.sampler_options("ddim")["grid"] == "quadratic"
    assert abs(gap("vp", "gmm8", "ddim", 50)[0]) <= 0.05
    for law in LAWS:
        assert abs(gap("vp", law, "ddim", 50)[0]) < abs(
            gap("vp", law, "ddim", 50, grid="uniform")[0]
        )
        sde, mixture = make_sde("vp"), LAWS[law]()
        score = exact_score(sde, mixture)
        g = torch.Generator().manual_seed(9)
        x_T = sde.prior_sampling((2000, mixture.dim), generator=g).double()
        end = reference(sde, score, x_T, 1e-3, 100, 2)[1][-1]
        flow = samplers.tweedie_denoise(sde, score, end, 1e-3)
        errors = {
            grid: (
                samplers.sample(sde, score, x_T.shape, "ddim", 50, x_T=x_T.clone(), grid=grid)[0]
                - flow
            )
            .square()
            .sum(1)
            .mean()
            .item()
            for grid in samplers.GRIDS
        }
        assert min(errors, key=errors.get) == "quadratic", errors


def test_fast_reads_the_sde_kind_from_its_coefficients():
    from samplers.fast import sde_kind

    assert [sde_kind(make_sde(n)) for n in ("vp", "subvp", "ve")] == ["vp", "subvp", "ve"]
    assert sde_kind(VESDE(sigma_min=0.1, sigma_max=3.0)) == "ve"


# ---------------------------------------------------------------- optimised grids


def held_out_mse(sde, score, held, steps):
    """(grid, sampler) -> mean squared distance of the sampler's (default UniPC) `steps`-step
    output from held (B, D) to the 400-step reference flow of the same score (both denoised);
    grid=None takes the sampler's own default."""
    from samplers.optimise_grid import reference

    with torch.no_grad():
        _, states = reference(sde, score, held, 1e-3, 100, 4)
        target = samplers.tweedie_denoise(sde, score, states[-1], 1e-3)

    def mse(grid=None, sampler="unipc"):
        options = {} if grid is None else {"grid": grid}
        y, nfe = samplers.sample(sde, score, held.shape, sampler, steps, x_T=held, **options)
        assert nfe == steps + 1
        return (y - target).square().sum(1).mean().item()

    return mse


def test_optimised_grid_beats_fixed_grids_on_held_out_data_and_round_trips(tmp_path):
    """A 10-NFE UniPC schedule fitted on 1000 calibration points (VP, gmm8) has, on 2000 held-out
    points, a smaller mean squared distance to the reference than every fixed grid; written to
    JSON it gives the same samples through grid=<path>, in Python and from run.py's config."""
    from samplers.optimise_grid import optimise_grid

    sde, law = make_sde("vp"), gmm8()
    score = exact_score(sde, law)
    cal = sde.prior_sampling((1000, 2), generator=torch.Generator().manual_seed(0)).double()
    held = sde.prior_sampling((2000, 2), generator=torch.Generator().manual_seed(5)).double()
    ts, info = optimise_grid(sde, score, cal, samplers.sample_unipc, 9)
    mse = held_out_mse(sde, score, held, 9)
    fixed = {g: mse(g) for g in samplers.GRIDS}
    assert mse(ts) < min(fixed.values()), (mse(ts), fixed)
    path = samplers.save_schedule(tmp_path / "s.json", ts, fit=info)
    torch.testing.assert_close(
        samplers.sample(sde, score, held.shape, "unipc", 9, x_T=held, grid=str(path))[0],
        samplers.sample(sde, score, held.shape, "unipc", 9, x_T=held, grid=ts)[0],
    )


def test_optimise_grid_weights_each_batch():
    """weights: a zero weight drops a batch from the objective (the fit equals the one on the other
    batch alone), normalise=True divides each batch's weight by its error on the logSNR grid, and
    a wrong count is refused before any score evaluation."""
    from samplers.optimise_grid import optimise_grid

    sde, laws = make_sde("vp"), [gmm8(), mixture5d()]
    fns = [exact_score(sde, law) for law in laws]
    g = torch.Generator().manual_seed(0)
    cal = [sde.prior_sampling((300, law.dim), generator=g).double() for law in laws]
    fit = dict(sweeps=2, candidates=40)
    alone, _ = optimise_grid(sde, fns[0], cal[0], samplers.sample_unipc, 5, **fit)
    dropped, info = optimise_grid(
        sde, fns, cal, samplers.sample_unipc, 5, weights=[1.0, 0.0], **fit
    )
    torch.testing.assert_close(dropped, alone, rtol=0, atol=0)
    assert info["weights"] == [1.0, 0.0]
    _, info = optimise_grid(
        sde, fns, cal, samplers.sample_unipc, 5, weights=[1.0, 0.5], normalise=True, **fit
    )
    from samplers.optimise_grid import reference

    for f, x, w, given in zip(fns, cal, info["weights"], (1.0, 0.5), strict=True):
        target = samplers.tweedie_denoise(sde, f, reference(sde, f, x, 1e-3, 40, 4)[1][-1], 1e-3)
        y, _ = samplers.sample(sde, f, x.shape, "unipc", 5, x_T=x, grid="logsnr")
        assert w == pytest.approx(given / (y - target).square().sum(1).mean().item(), rel=1e-6)
    # every fixed grid's objective is then a weighted sum of ratios to logSNR's: 1 + 0.5 there
    assert info["mse_start"]["logsnr"] == pytest.approx(1.5, rel=1e-9)
    calls = []
    with pytest.raises(ValueError, match=r"weights must be one number per batch \(1\)"):
        optimise_grid(
            sde,
            lambda x, t: calls.append(1) or x,
            cal[0],
            samplers.sample_unipc,
            5,
            weights=[1.0, 2.0],
        )
    assert not calls


@pytest.mark.parametrize(("sampler", "bound"), [("unipc", 0.7), ("fast", 0.7), ("heun", 0.75)])
def test_optimise_grid_replays_the_unchanged_steps_and_finds_the_same_schedule(
    monkeypatch, sampler, bound
):
    """Replaying the kept run's evaluations gives bit for bit the schedule, objective and
    compared runs of evaluating every call, with every call accounted for (evaluated + replayed
    = the calls made without replay) and at most `bound` of them evaluated (measured at 9 steps:
    66% for UniPC, 63% for fast, 69% for Heun; the starts are not replayed)."""
    import samplers.optimise_grid as og

    sde, law = make_sde("vp"), gmm8()
    score = exact_score(sde, law)
    cal = sde.prior_sampling((200, 2), generator=torch.Generator().manual_seed(3)).double()
    fn = samplers.api._lookup(sampler)
    fit = dict(sweeps=2, candidates=40, compare={"logsnr": lambda x: fn(sde, score, x, steps=9)})
    ts, info = og.optimise_grid(sde, score, cal, fn, 9, **fit)

    class EvaluateEveryCall(og._Replay):
        def __call__(self, x, t):
            self.kept = []
            return super().__call__(x, t)

    monkeypatch.setattr(og, "_Replay", EvaluateEveryCall)
    plain_ts, plain = og.optimise_grid(sde, score, cal, fn, 9, **fit)
    torch.testing.assert_close(ts, plain_ts, rtol=0, atol=0)
    for key in ("start", "mse_start", "mse", "positions", "mse_compare"):
        assert info[key] == plain[key], key
    assert plain["replayed"] == 0
    assert info["evaluations"] + info["replayed"] == plain["evaluations"]
    assert info["evaluations"] <= bound * plain["evaluations"], (info, plain["evaluations"])


def test_refit_starts_name_grids_within_the_step_ratio_bound():
    """Every fixed grid a gap-constrained entry's recipe starts from is a known grid, and
    within_ratio brings it within the entry's step-ratio bound."""
    from samplers.fast import load_table
    from tasks.fast_refit import within_ratio

    sde = make_sde("vp")
    recipes = {k: e["fit"] for k, e in load_table().items() if "gap_tol" in e["fit"]}
    assert set(recipes) == {"vp/9", "vp/14", "vp/19", "subvp/9", "subvp/19", "ve/9", "ve/19"}
    assert recipes["ve/9"]["gap_starts"] == ["uniform"]
    assert recipes["ve/19"]["gap_starts"] == ["logsnr"]
    for key, recipe in recipes.items():
        steps, bound = int(key.split("/")[1]), recipe["max_step_ratio"]
        for name in recipe["gap_starts"]:
            ts = samplers.get_grid(name, sde, steps, 1e-3)
            u = samplers.grids.lambda_positions(sde, ts, 1e-3)
            h = np.diff(within_ratio(u, bound))
            assert (h > 0).all() and (h[1:] / h[:-1]).max() <= bound * (1 + 1e-9)
            assert (h[:-1] / h[1:]).max() <= bound * (1 + 1e-9)


@pytest.mark.slow
def test_gap_constrained_fit_brings_the_paired_gaps_within_tol():
    """From the logSNR grid (paired gaps about 0.4 on VP gmm8 and mix5d at 10 NFE), the fit
    brings both laws' paired log-density gaps within tol (plus the solver's slack), reports
    gaps that an independent run reproduces, keeps the step-ratio bound, and the objective's
    error is the one it reports. Slow: it tests the tool that refits the shipped schedules; the
    default run checks the shipped schedules' gaps (test_fast_at_10_nfe, _15_, _20_)."""
    from samplers.fast import entry
    from samplers.grids import lambda_positions, schedule_times
    from samplers.optimise_grid import reference
    from tasks.fast_refit import gap_constrained_fit

    sde, laws = make_sde("vp"), [gmm8(), mixture5d()]
    g = torch.Generator().manual_seed(3)
    xs = [sde.prior_sampling((1000, law.dim), generator=g).double() for law in laws]
    start = lambda_positions(sde, samplers.grids.get_grid("logsnr", sde, 9, 1e-3), 1e-3)
    objective = [(exact_score(sde, laws[0]), xs[0][:300])]
    e = entry(sde, 9)
    solver, options = e["solver"], e["options"]
    u, info = gap_constrained_fit(
        sde, 9, (solver, options), start, laws, xs, objective, tol=0.03, evals=150
    )
    assert min(abs(v) for v in info["start_gaps"]) > 0.1, info["start_gaps"]
    assert max(abs(v) for v in info["gaps"]) <= 0.04, info["gaps"]
    assert info["start"] == "given" and info["hop"] == 0  # no hops asked for
    times = schedule_times(sde, u, 1e-3)
    h = samplers.grids.log_snr(sde, times).diff()
    assert float(torch.maximum(h[1:] / h[:-1], h[:-1] / h[1:]).max()) <= 3.0
    for law, x, reported in zip(laws, xs, info["gaps"], strict=True):
        f = exact_score(sde, law)
        y, _ = samplers.sample(sde, f, x.shape, solver, 9, x_T=x.clone(), grid=times, **options)
        ref = samplers.tweedie_denoise(sde, f, reference(sde, f, x, 1e-3, 100, 4)[1][-1], 1e-3)
        assert (law.log_prob(y).mean() - law.log_prob(ref).mean()).item() == pytest.approx(
            reported, abs=1e-9
        )
    f, x = objective[0]
    y, _ = samplers.sample(sde, f, x.shape, solver, 9, x_T=x.clone(), grid=times, **options)
    ref = samplers.tweedie_denoise(sde, f, reference(sde, f, x, 1e-3, 100, 4)[1][-1], 1e-3)
    assert (y - ref).square().sum(1).mean().item() == pytest.approx(info["errors"][0], rel=1e-9)


@pytest.mark.slow
def test_gap_constrained_fit_of_a_final_step_entry():
    """final_step=True fits FINAL_STEP's solver with steps + 1 steps and no denoising, within
    FINAL_STEP_RATIO: from the uniform-t grid (sub-VP mix5d paired gap -0.07) to within tol
    (plus slack), with gaps that 10 plain iPNDM steps on the result reproduce. Slow, like the
    plain entries' fit above."""
    from samplers.fast import entry
    from samplers.grids import schedule_times
    from samplers.optimise_grid import reference
    from tasks.fast_refit import gap_constrained_fit

    sde, laws = make_sde("subvp"), [gmm8(), mixture5d()]
    g = torch.Generator().manual_seed(3)
    xs = [sde.prior_sampling((600, law.dim), generator=g).double() for law in laws]
    objective = [(exact_score(sde, laws[1]), xs[1][:200])]
    final = entry(sde, 9)["final_step"]
    solver, options, bound = final["solver"], final["options"], final["fit"]["max_step_ratio"]
    u, info = gap_constrained_fit(
        sde, 10, (solver, options), None, laws, xs, objective, tol=0.02, bound=bound,
        evals=150, starts=("uniform",), denoise=False,
    )  # fmt: skip
    assert len(u) == 11 and info["start"] == "uniform"
    assert max(abs(v) for v in info["start_gaps"]) > 0.05, info["start_gaps"]
    assert max(abs(v) for v in info["gaps"]) <= 0.021, info["gaps"]
    times = schedule_times(sde, u, 1e-3)
    h = samplers.grids.log_snr(sde, times).diff()
    assert float(torch.maximum(h[1:] / h[:-1], h[:-1] / h[1:]).max()) <= bound
    for law, x, reported in zip(laws, xs, info["gaps"], strict=True):
        f = exact_score(sde, law)
        y = samplers.SAMPLERS[solver](sde, f, x.clone(), steps=10, grid=times, **options)
        ref = samplers.tweedie_denoise(sde, f, reference(sde, f, x, 1e-3, 100, 4)[1][-1], 1e-3)
        assert (law.log_prob(y).mean() - law.log_prob(ref).mean()).item() == pytest.approx(
            reported, abs=1e-9
        )


def test_optimise_grid_command_writes_a_usable_schedule(tmp_path, caplog):
    from tasks.schedules import main

    caplog.set_level("INFO")

    path = main(
        [
            "fit",
            "--sde",
            "ve",
            "--data",
            "gmm8",
            "--solver",
            "ipndm",
            "--nfe",
            "6",
            "--batch",
            "300",
            "--out",
            str(tmp_path / "ve6.json"),
        ]
    )
    record = json.loads(path.read_text())
    assert record["steps"] == 5 and len(record["times"]) == 6 and record["solver"] == "ipndm"
    assert "wrote" in caplog.text
    sde = make_sde("ve")
    x, nfe = samplers.sample(
        sde, exact_score(sde, gmm8()), (8, 2), "dpm_solver3", 5, grid=str(path)
    )
    assert nfe == 6 and torch.isfinite(x).all()
    with pytest.raises(ValueError, match=r"has 5 steps \(6 times\) but steps=9; set steps=5"):
        samplers.sample(sde, exact_score(sde, gmm8()), (8, 2), "unipc", 9, grid=str(path))


def test_schedule_file_from_run_py(tmp_path):
    sde = make_sde("vp")
    path = samplers.save_schedule(tmp_path / "s.json", samplers.get_grid("edm", sde, 9, 1e-3))
    m, _ = run_mode(
        tmp_path,
        "json",
        "mode=sample",
        "model=exact",
        "sampler=unipc",
        "sampler.steps=9",
        f"sampler.grid={path}",
        "sampler.n_samples=100",
    )
    assert m["nfe"] == 10
    # a file fitted for other steps, a bad option value: one line (UserError), before sampling
    from tasks import UserError

    for bad, needle in (
        (("sampler.steps=7",), "set steps=9"),
        (("sampler.steps=9", "sampler.order=5"), "sampler.order=5"),
        (("sampler.steps=9", "sampler.variant=bh3"), "sampler.variant='bh3'"),
    ):
        with pytest.raises(UserError, match=needle):
            run_mode(
                tmp_path,
                "bad",
                "mode=sample",
                "model=exact",
                "sampler=unipc",
                f"sampler.grid={path}",
                *bad,
            )


def test_shipped_schedules_have_no_near_empty_steps():
    """Neighbouring lambda-steps of every shipped schedule differ by at most the bound in its
    recipe (3 up to 12 steps, 6 above, 6 for the final-step entry): unbounded fits to exact
    scores learned near-empty steps (ratios above 100) that gave FID 68 at 10 NFE on a trained
    digits U-Net, where every fixed grid gives 7-10. Every kind has all of 4..24 steps."""
    from samplers.fast import load_table
    from samplers.grids import schedule_times

    table = load_table()
    assert set(table) == {f"{k}/{n}" for k in ("vp", "subvp", "ve") for n in range(4, 25)}
    for key, e in table.items():
        sde, steps = make_sde(key.split("/")[0]), int(key.split("/")[1])
        assert e["fit"]["max_step_ratio"] == (3.0 if steps <= 12 else 6.0) and e["provenance"]
        for part in (e, e.get("final_step")):
            if part is None:
                continue
            h = samplers.grids.log_snr(sde, schedule_times(sde, part["positions"], 1e-3)).diff()
            ratio = float(torch.maximum(h[1:] / h[:-1], h[:-1] / h[1:]).max())
            assert ratio <= part["fit"]["max_step_ratio"] * 1.001, (key, ratio)


@pytest.fixture(scope="module")
def trained_gmm8(tmp_path_factory):
    """The training summary of a gmm8 MLP score model trained for 150 steps (VP)."""
    summary, _ = run_mode(tmp_path_factory.mktemp("gmm8"), "t", "mode=train", "training.steps=150")
    return summary


@pytest.mark.slow  # 10-20 s: too long for the default run (CI runs -m slow too)
def test_optimise_grid_fits_a_trained_checkpoint(tmp_path, capsys, trained_gmm8):
    """--checkpoint: the schedule is fitted to the trained model itself; on a held-out batch it is
    closer to that model's reference flow than every fixed grid, run.py samples with it, and a
    bad checkpoint is one line with exit code 2."""
    from tasks.common import load_score_model
    from tasks.schedules import main
    from training import checkpoint as ckpt

    summary = trained_gmm8
    path = main(
        [
            "fit",
            "--checkpoint",
            str(summary["checkpoint"]),
            "--solver",
            "unipc",
            "--nfe",
            "6",
            "--batch",
            "300",
            "--out",
            str(tmp_path / "fit.json"),
        ]
    )
    record = json.loads(path.read_text())
    assert record["checkpoint"] == str(summary["checkpoint"]) and record["steps"] == 5
    saved = ckpt.config_of(ckpt.load(summary["checkpoint"]))
    sde, _, model, _ = load_score_model({**saved, "ckpt": summary["checkpoint"]})
    held = sde.prior_sampling((1000, 2), generator=torch.Generator().manual_seed(5))
    mse = held_out_mse(sde, model, held, 5)
    fixed = {g: mse(g) for g in samplers.GRIDS}
    assert mse(str(path)) < min(fixed.values()), (mse(str(path)), fixed)
    m, _ = run_mode(
        tmp_path,
        "s",
        "mode=sample",
        f"ckpt={summary['checkpoint']}",
        "sampler=unipc",
        "sampler.steps=5",
        f"sampler.grid={path}",
        "sampler.n_samples=100",
    )
    assert m["nfe"] == 6
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["fit", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "none.pt" in err, err


def test_grid_fit_from_run_py_reproduces_through_its_file(tmp_path):
    """sampler.grid=fit from run.py (exact gmm8 score, UniPC at 5 steps): the fitted steps are
    written to the run folder, the NFE excludes the fit, the file reproduces the run's samples
    bit for bit through sampler.grid=<path>, and a stochastic sampler or another task is
    refused with one line. (Whether the fit leads on a trained model: the slow
    test_fast_with_a_fitted_grid_leads_on_a_trained_model.)"""
    from tasks import UserError

    run = (
        "mode=sample",
        "model=exact",
        "sampler=unipc",
        "sampler.steps=5",
        "sampler.n_samples=300",
    )
    m, out = run_mode(tmp_path, "fit", *run, "sampler.grid=fit")
    path = out / "schedule.json"
    record = json.loads(path.read_text())
    assert m["nfe"] == 6 and record["solver"] == "unipc" and record["steps"] == 5
    times = record["times"]
    assert len(times) == 6 and all(a > b for a, b in zip(times, times[1:])), times
    _, out2 = run_mode(tmp_path, "reuse", *run, f"sampler.grid={path}")
    a, b = (np.load(o / "samples.npz")["samples"] for o in (out, out2))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match=r"sampler.grid=fit is not allowed for sampler=pc"):
        run_mode(tmp_path, "bad", "mode=sample", "model=exact", "sampler=pc", "sampler.grid=fit")
    with pytest.raises(UserError, match=r"sampler.grid=fit works with sampler.task=sample only"):
        run_mode(
            tmp_path,
            "bad2",
            "mode=sample",
            "model=exact",
            "sampler=unipc",
            "sampler.grid=fit",
            "sampler.task=inpaint",
        )


@pytest.mark.slow
def test_fast_with_a_fitted_grid_leads_on_a_trained_model(tmp_path, trained_gmm8):
    """sampler.grid=fit from run.py: the steps are fitted once to the trained model's own flow and
    written to the run folder. On a held-out batch that schedule puts fast ahead of fast's shipped
    one and of every fixed grid with UniPC, DPM-Solver++(2M) and iPNDM at the same 10 NFE (the
    trained-model ordering of issue 10); the file reproduces the run's samples through
    sampler.grid=<path>; a stochastic sampler or another task is refused with one line.

    Slow (~35 s of CPU: the fit and 13 held-out comparisons). In the default run
    test_grid_fit_from_run_py_reproduces_through_its_file checks sampler.grid=fit from run.py
    (with the exact score), and test_optimise_grid_fits_a_trained_checkpoint fits a schedule to
    the same trained checkpoint and checks that it beats every fixed grid."""
    from tasks import UserError
    from tasks.common import load_score_model
    from training import checkpoint as ckpt

    ck = str(trained_gmm8["checkpoint"])
    run = ("mode=sample", f"ckpt={ck}", "sampler=fast", "sampler.steps=9", "sampler.n_samples=300")
    m, out = run_mode(tmp_path, "fit", *run, "sampler.grid=fit")
    path = out / "schedule.json"
    record = json.loads(path.read_text())
    assert m["nfe"] == 10 and record["solver"] == "fast" and record["steps"] == 9
    m2, out2 = run_mode(tmp_path, "reuse", *run, f"sampler.grid={path}")
    a, b = (np.load(o / "samples.npz")["samples"] for o in (out, out2))
    np.testing.assert_array_equal(a, b)

    saved = ckpt.config_of(ckpt.load(ck))
    sde, _, model, _ = load_score_model({**saved, "ckpt": ck})
    held = sde.prior_sampling((1000, 2), generator=torch.Generator().manual_seed(5))
    err = held_out_mse(sde, model, held, 9)
    fitted = err(str(path), "fast")
    others = {"fast/shipped": err(None, "fast")}
    others.update(
        {f"{s}/{g}": err(g, s) for s in ("unipc", "dpm_solver", "ipndm") for g in samplers.GRIDS}
    )
    assert fitted < min(others.values()), (fitted, others)
    with pytest.raises(UserError, match=r"sampler.grid=fit is not allowed for sampler=pc"):
        run_mode(tmp_path, "bad", "mode=sample", f"ckpt={ck}", "sampler=pc", "sampler.grid=fit")
    with pytest.raises(UserError, match=r"sampler.grid=fit works with sampler.task=sample only"):
        run_mode(
            tmp_path,
            "bad2",
            "mode=sample",
            "model=exact",
            "sampler=unipc",
            "sampler.grid=fit",
            "sampler.task=inpaint",
        )


@pytest.mark.slow  # one fit, ~15 s
def test_grid_auto_fits_once_per_checkpoint_and_is_never_worse_than_the_default(
    tmp_path, trained_gmm8, monkeypatch
):
    """sampler.grid=auto: the first run fits (the fitted schedule and the shipped default scored
    on the same calibration batch, the closer kept) and caches the result under
    outputs_root/schedules; a second run reuses it without fitting and draws the same samples;
    the exact score falls back to the default grid without fitting. auto is fast's default: a run
    that names no grid takes the cached schedule too; other tasks keep the shipped one."""
    import tasks.sample as sample_task

    ck = str(trained_gmm8["checkpoint"])
    run = ("mode=sample", f"ckpt={ck}", "sampler=fast", "sampler.steps=9", "sampler.n_samples=200")
    _, out = run_mode(tmp_path, "first", *run, "sampler.grid=auto")
    (cached,) = (tmp_path / "schedules").glob("fast_9_*.json")
    auto = json.loads(cached.read_text())["auto"]
    kept = auto["mse_fitted"] if auto["choice"] == "fitted" else auto["mse_default"]
    assert kept == min(auto["mse_fitted"], auto["mse_default"]) and kept <= auto["mse_default"]

    def no_fit(*a, **k):
        raise AssertionError("grid=auto fitted again instead of reusing its cached schedule")

    monkeypatch.setattr(sample_task, "fit_schedule", no_fit)
    _, out2 = run_mode(tmp_path, "second", *run, "sampler.grid=auto")
    _, out3 = run_mode(tmp_path, "default", *run)  # auto is fast's default: the same cache
    a, b, c = (np.load(o / "samples.npz")["samples"] for o in (out, out2, out3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    if auto["choice"] == "default":  # the default grid kept: the same as sampling without auto
        _, out4 = run_mode(tmp_path, "plain", *run, "sampler.grid=null")
        np.testing.assert_array_equal(a, np.load(out4 / "samples.npz")["samples"])
    run_mode(tmp_path, "exact", "mode=sample", "model=exact", "sampler=fast", "sampler.grid=auto")
    run_mode(tmp_path, "inpaint", "mode=sample", f"ckpt={ck}", "sampler=fast", "sampler.steps=9",
             "sampler.task=inpaint", "sampler.n_samples=50")  # fmt: skip


@pytest.mark.slow  # one refit of an entry, ~10 s; the default run checks a table file below
def test_refit_writes_a_table_of_the_users_that_fast_then_samples_with(tmp_path):
    """`tasks.schedules refit --out` refits an entry by its recipe into the user's file (never
    the package's: its bytes are unchanged, and naming it as --out is refused), keeps the other
    entries as they were, and sampler=fast sampler.grid=<that file> runs the refitted schedule:
    exactly the entry's solver on the new positions. A malformed table is one line."""
    from samplers.fast import TABLE_FILE, entry, load_table
    from samplers.grids import schedule_times
    from tasks import UserError
    from tasks.schedules import main

    shipped = TABLE_FILE.read_bytes()
    base = json.loads(shipped)
    base["calibration"]["exact_points"] = 200  # a cheaper calibration than the shipped fit's
    (tmp_path / "base.json").write_text(json.dumps(base))
    out = tmp_path / "mine.json"
    # ve/13: fitted to the exact mixtures alone (trained_weight 0), no gap constraint
    main(["refit", "--base", str(tmp_path / "base.json"), "--out", str(out), "--kinds", "ve",
          "--steps", "13"])  # fmt: skip
    assert TABLE_FILE.read_bytes() == shipped
    mine, old = load_table(out), load_table(TABLE_FILE)
    assert {k for k in old if mine[k] != old[k]} == {"ve/13"}
    assert mine["ve/13"]["solver"] == old["ve/13"]["solver"]
    assert mine["ve/13"]["positions"] != old["ve/13"]["positions"]
    assert json.loads(out.read_text())["refitted"]["entries"] == ["ve/13"]

    sde = make_sde("ve")
    score = exact_score(sde, gmm8())
    x_T = sde.prior_sampling((50, 2), generator=torch.Generator().manual_seed(2)).double()
    x, nfe = samplers.sample(sde, score, x_T.shape, "fast", 13, x_T=x_T.clone(), grid=str(out))
    e = entry(sde, 13, out)
    times = schedule_times(sde, e["positions"], 1e-3)
    y = samplers.SAMPLERS[e["solver"]](
        sde, score, x_T.clone(), steps=13, grid=times, **e["options"]
    )
    assert nfe == 14
    torch.testing.assert_close(x, samplers.tweedie_denoise(sde, score, y, 1e-3), rtol=0, atol=0)
    m, _ = run_mode(tmp_path, "s", "mode=sample", "model=exact", "sde=ve", "sampler=fast",
                    "sampler.steps=13", f"sampler.grid={out}", "sampler.n_samples=50")  # fmt: skip
    assert m["nfe"] == 14

    with pytest.raises(SystemExit) as e:  # the package's own file is not a refit's target
        main(["refit", "--out", str(TABLE_FILE), "--kinds", "ve", "--steps", "13"])
    assert e.value.code == 2 and TABLE_FILE.read_bytes() == shipped
    with pytest.raises(SystemExit) as e:  # a recipe with trained models needs them
        main(["refit", "--out", str(tmp_path / "x.json"), "--kinds", "vp", "--steps", "9"])
    assert e.value.code == 2
    bad = json.loads(out.read_text())
    bad["entries"]["ve/13"]["positions"] = bad["entries"]["ve/13"]["positions"][:-2] + [1.0]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"entry 've/13' is malformed"):
        run_mode(tmp_path, "b", "mode=sample", "model=exact", "sde=ve", "sampler=fast",
                 "sampler.steps=13", f"sampler.grid={tmp_path / 'bad.json'}")  # fmt: skip


def test_a_table_file_replaces_the_shipped_one(tmp_path):
    """sampler.grid=<a table of fast's format> (what a refit writes): fast runs that table's
    entry, exactly its solver on its positions; an entry it does not change samples as the
    shipped table does; a malformed entry is one line from run.py. (The slow
    test_refit_writes_a_table_of_the_users_that_fast_then_samples_with samples from run.py with
    a refitted table.)"""
    from samplers.fast import TABLE_FILE, entry
    from samplers.grids import schedule_times
    from tasks import UserError

    table = json.loads(TABLE_FILE.read_text())
    mine = table["entries"]["ve/13"]
    mine["positions"] = np.linspace(0, 1, 14).tolist()  # uniform in lambda
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(table))
    sde = make_sde("ve")
    score = exact_score(sde, gmm8())
    x_T = sde.prior_sampling((50, 2), generator=torch.Generator().manual_seed(2)).double()
    x, nfe = samplers.sample(sde, score, x_T.shape, "fast", 13, x_T=x_T.clone(), grid=str(path))
    assert entry(sde, 13, path)["positions"] == mine["positions"] and nfe == 14
    times = schedule_times(sde, mine["positions"], 1e-3)
    y = samplers.SAMPLERS[mine["solver"]](sde, score, x_T.clone(), steps=13, grid=times,
                                         **mine["options"])  # fmt: skip
    torch.testing.assert_close(x, samplers.tweedie_denoise(sde, score, y, 1e-3), rtol=0, atol=0)
    shipped, _ = samplers.sample(sde, score, x_T.shape, "fast", 12, x_T=x_T.clone())
    other, _ = samplers.sample(sde, score, x_T.shape, "fast", 12, x_T=x_T.clone(), grid=str(path))
    torch.testing.assert_close(other, shipped, rtol=0, atol=0)
    mine["positions"] = mine["positions"][:-2] + [1.0]
    (tmp_path / "bad.json").write_text(json.dumps(table))
    with pytest.raises(UserError, match=r"entry 've/13' is malformed"):
        run_mode(tmp_path, "b", "mode=sample", "model=exact", "sde=ve", "sampler=fast",
                 "sampler.steps=13", f"sampler.grid={tmp_path / 'bad.json'}")  # fmt: skip


def test_a_table_read_is_the_callers_and_a_rewritten_file_is_read_afresh(tmp_path):
    """load_table and entry parse a file once, but hand out copies: a caller who edits what it
    got changes nothing for the next caller; and a table file rewritten in place (a refit into
    the same --out) is read anew, not served from the cache."""
    import os

    from samplers.fast import TABLE_FILE, entry, load_table

    sde = make_sde("vp")
    first = load_table()
    first["vp/9"]["options"]["poisoned"] = True
    first["vp/9"]["positions"] = None
    e = entry(sde, 9)
    e["options"]["poisoned"] = True
    assert "poisoned" not in load_table()["vp/9"]["options"]
    assert "poisoned" not in entry(sde, 9)["options"]
    assert (
        entry(sde, 9)["positions"]
        == json.loads(TABLE_FILE.read_text())["entries"]["vp/9"]["positions"]
    )

    mine = tmp_path / "mine.json"
    table = json.loads(TABLE_FILE.read_text())
    mine.write_text(json.dumps(table))
    assert entry(sde, 9, mine)["solver"] == table["entries"]["vp/9"]["solver"]
    other = "ipndm" if table["entries"]["vp/9"]["solver"] == "unipc" else "unipc"
    table["entries"]["vp/9"]["solver"], table["entries"]["vp/9"]["options"] = other, {}
    mine.write_text(json.dumps(table))
    stat = mine.stat()  # a rewrite within the clock's resolution still moves the key
    os.utime(mine, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert entry(sde, 9, mine)["solver"] == other
