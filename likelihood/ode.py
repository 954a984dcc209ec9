"""Log-likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

The PF ODE dx/dt = v(x, t) = f(x, t) - 1/2 g(t)^2 score(x, t) carries p_eps to p_T, and along a
trajectory the instantaneous change of variables (Chen et al. 2018, Thm 1) gives
    d/dt log p_t(x_t) = -div v(x_t, t),
so, integrating from t = eps (the data) to t = T (the prior),
    log p_eps(x) = log p_T(x_T) + int_eps^T div v(x_t, t) dt.
p_T is replaced by the prior pi = `sde.prior_logp`. What is computed is the density at time eps of
the model defined by the ODE, evaluated at x; for eps -> 0 it tends to the density of the data.

The state (x_t, a_t) is integrated jointly, with one accumulator a per divergence probe: a (P, B),
P = 1 for the exact trace. Hutchinson probes are drawn once per example and held fixed along the
trajectory, so each accumulator is an unbiased estimate of the integral and their spread over the
P probes gives the Monte Carlo standard error.

Three backends integrate the same ODE:
  * "perpoint" (the default): `sde_lib.rk`, one step size and error control per point, so that a
    point's log p depends only on the point, the model and the tolerances, never on its batch
    (its batch-mates, the batch size, the split across processes), and a hard point does not make
    the others take small steps;
  * "torchdiffeq": one step size for the batch, from the batch's joint error norm;
  * "scipy": `solve_ivp` on the state flattened to one float64 vector (the torch field inside).

With grad=True the result is differentiable in x and in the score model's parameters, by
backpropagation through the solver's steps (the gradient of the computed value, exact for it;
an adjoint solve would add its own solver error and re-evaluate the field backwards, and for the
few hundred steps of these solves the stored graph fits in memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torchdiffeq import odeint

from sde_lib import SDE, ScoreFn
from sde_lib.rk import TABLEAUS, solve_per_point

from .divergence import draw_probes, exact_divergence, hutchinson_divergence

DIVERGENCES = ("exact", "hutchinson")
BACKENDS = ("perpoint", "torchdiffeq", "scipy")
PERPOINT_METHODS = tuple(TABLEAUS)
# torchdiffeq's adaptive solvers (its fixed-grid ones would take one step from eps to T).
TORCHDIFFEQ_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
# torchdiffeq names of the Runge-Kutta pairs scipy also has; scipy's own names are accepted too.
SCIPY_METHODS = {"dopri5": "RK45", "bosh3": "RK23", "dopri8": "DOP853"}
SCIPY_OWN = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")

# (t, x: (B, *D)) -> (dx/dt: (B, *D), per-probe divergence: (P, B))
AugmentedField = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LikelihoodResult:
    """Per-example log p(x) in nats and its cost.

    logp: (B,), the average over probes; nfe: evaluations of the ODE field (each one field
    evaluation plus its divergence) on the batch; nfe_per_point: (B,) the evaluations each
    point's own solve took (backend "perpoint"; the others give every point nfe); stderr: (B,)
    standard error of the probe average (std over probes / sqrt(P)), zeros for the exact trace,
    None for Hutchinson with one probe (no spread to estimate it from). It excludes the solver's
    own error.
    """

    logp: torch.Tensor
    nfe: int
    stderr: torch.Tensor | None
    nfe_per_point: torch.Tensor | None = None


def _augmented_field(
    sde: SDE,
    score_fn: ScoreFn,
    divergence: str,
    probes: torch.Tensor | None,
    create_graph: bool = False,
):
    """The PF-ODE velocity and its divergence at time t (a scalar tensor, or (b,) per row) for
    the rows `rows` of the batch (None: all of it)."""
    pf_ode = sde.reverse(score_fn, probability_flow=True)

    def field(t: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None):
        # t stays on the device (no host round trip per evaluation); a float for scipy
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])

        def velocity(y: torch.Tensor) -> torch.Tensor:
            return pf_ode.sde(y, tt)[0]

        if divergence == "exact":
            v, div = exact_divergence(velocity, x, create_graph)
            return v, div[None]
        u = probes if rows is None else probes[:, rows]
        return hutchinson_divergence(velocity, x, u, create_graph)

    return field


def _solve_torchdiffeq(
    field: AugmentedField,
    x: torch.Tensor,
    acc: torch.Tensor,
    span: tuple[float, float],
    method: str,
    rtol: float,
    atol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if method not in TORCHDIFFEQ_METHODS:
        raise ValueError(
            f"method {method!r} is not an adaptive torchdiffeq solver; "
            f"allowed: {', '.join(TORCHDIFFEQ_METHODS)}"
        )

    lo, hi = min(span), max(span)

    def rhs(
        t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # torchdiffeq picks its first step by evaluating at t0 + h0, far beyond T when the field
        # is nearly zero (an untrained network), where the SDE's coefficients overflow (VE:
        # sigma(9) ~ 1e33); the steps themselves stay in [eps, T], so clamping changes no step
        return field(t.clamp(lo, hi), state[0])

    ts = torch.tensor(span, dtype=torch.float64, device=x.device)
    xs, accs = odeint(rhs, (x, acc), ts, rtol=rtol, atol=atol, method=method)
    return xs[-1], accs[-1]


def _flat64(v: torch.Tensor) -> np.ndarray:
    return v.detach().to("cpu", torch.float64).numpy().ravel()


def _solve_scipy(
    field: AugmentedField,
    x: torch.Tensor,
    acc: torch.Tensor,
    span: tuple[float, float],
    method: str,
    rtol: float,
    atol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if method in SCIPY_METHODS:
        method = SCIPY_METHODS[method]
    elif method not in SCIPY_OWN:
        allowed = ", ".join([*SCIPY_METHODS, *SCIPY_OWN])
        raise ValueError(f"method {method!r} has no scipy counterpart; allowed: {allowed}")
    n = x.numel()

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        state = torch.from_numpy(y[:n]).to(x.device, x.dtype).reshape(x.shape)
        v, div = field(torch.tensor(t), state)
        return np.concatenate([_flat64(v), _flat64(div)])

    y0 = np.concatenate([_flat64(x), _flat64(acc)])
    sol = solve_ivp(rhs, span, y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    y1 = torch.from_numpy(sol.y[:, -1]).to(x.device, x.dtype)
    return y1[:n].reshape(x.shape), y1[n:].reshape(acc.shape)


def _solve_perpoint(field, x, acc, span, method, rtol, atol):
    """The augmented state as rows [x flattened | one accumulator per probe], error-controlled
    per row with x and the accumulators as separate groups (torchdiffeq's norm over a tuple
    state does the same): (x_T, acc_T, evaluations per point)."""
    if method not in PERPOINT_METHODS:
        raise ValueError(
            f"method {method!r} is not a per-point solver; allowed: {', '.join(PERPOINT_METHODS)}"
        )
    b, d = x.shape[0], x[0].numel()

    def rows_field(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        v, div = field(t, y[:, :d].reshape(-1, *x.shape[1:]), rows)
        return torch.cat([v.reshape(-1, d), div.t().to(v.dtype)], 1)

    y0 = torch.cat([x.reshape(b, d), acc.t()], 1)
    groups = [slice(0, d), slice(d, None)]
    sol = solve_per_point(rows_field, y0, span[0], span[1], method=method, rtol=rtol, atol=atol,
                          groups=groups)  # fmt: skip
    return sol.y1[:, :d].reshape(x.shape), sol.y1[:, d:].t(), sol.nfe


SOLVERS = {"torchdiffeq": _solve_torchdiffeq, "scipy": _solve_scipy}


def _flow_with_divergence(
    sde, score_fn, x, divergence, probe, n_probes, eps, generator, create_graph=False
):
    """(the augmented field (t, y) -> (dx/dt, d(log-density integral)/dt), zero accumulators
    (P, B)) for the PF ODE from the points x (B, *D), with the options checked: the divergence
    exact or Hutchinson with n_probes probes of kind `probe` drawn from `generator`, 0 < eps < T."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; allowed: {', '.join(DIVERGENCES)}")
    if not 0 < eps < sde.T:
        raise ValueError(f"need 0 < eps < T = {sde.T}, got eps={eps}")
    probes = None
    if divergence == "hutchinson":
        probes = draw_probes(probe, n_probes, x, generator=generator)
    field = _augmented_field(sde, score_fn, divergence, probes, create_graph=create_graph)
    n_acc = 1 if probes is None else n_probes
    return field, torch.zeros(n_acc, x.shape[0], dtype=x.dtype, device=x.device)


def log_likelihood_stats(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    divergence: str = "exact",
    probe: str = "gaussian",
    n_probes: int = 1,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    backend: str = "perpoint",
    generator=None,
    grad: bool = False,
) -> LikelihoodResult:
    """log p(x) per example through the PF ODE, with its cost and Monte Carlo standard error.

    x: (B, *D) data (its dtype is the integration dtype; use float64 below rtol ~ 1e-6).
    divergence: "exact" (D vector-Jacobian products per evaluation) or "hutchinson" (n_probes
    products, probes `probe` = "gaussian" | "rademacher" drawn with `generator`, a torch.Generator
    or a noise source (keyed noise gives each point its own probes whatever its batch), fixed in
    time). method, rtol, atol: the adaptive solver and its tolerances (perpoint: "dopri5" |
    "bosh3"; torchdiffeq's names; for scipy "dopri5" means RK45, the same Dormand-Prince pair,
    and scipy's own names are accepted). eps: the start time, 0 < eps < T.
    backend: "perpoint" | "torchdiffeq" | "scipy". grad: differentiable in x and the model's
    parameters (perpoint and torchdiffeq).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if grad and backend == "scipy":
        raise ValueError("grad=True needs backend perpoint or torchdiffeq: scipy's solver has no "
                         "gradients")  # fmt: skip
    field, acc = _flow_with_divergence(
        sde, score_fn, x, divergence, probe, n_probes, eps, generator, create_graph=grad
    )
    calls = 0

    def counted(t: torch.Tensor, y: torch.Tensor, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal calls
        calls += 1
        return field(t, y, rows)

    per_point = None
    with torch.set_grad_enabled(grad):
        x_in = x if grad else x.detach()
        if backend == "perpoint":
            x_T, integral, per_point = _solve_perpoint(
                counted, x_in, acc, (eps, sde.T), method, rtol, atol
            )
        else:
            x_T, integral = SOLVERS[backend](counted, x_in, acc, (eps, sde.T), method, rtol, atol)
        logps = sde.prior_logp(x_T) + integral  # (P, B)
    logp = logps.mean(0)
    if divergence == "exact":
        stderr = torch.zeros_like(logp)
    elif n_probes > 1:
        stderr = logps.detach().std(0) / math.sqrt(n_probes)
    else:
        stderr = None
    if per_point is None:
        per_point = torch.full((x.shape[0],), calls, dtype=torch.long)
    return LikelihoodResult(logp=logp, nfe=calls, stderr=stderr, nfe_per_point=per_point)


def log_likelihood(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    divergence: str = "exact",
    probe: str = "gaussian",
    n_probes: int = 1,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    backend: str = "perpoint",
    generator=None,
    grad: bool = False,
) -> tuple[torch.Tensor, int]:
    """(log p(x): (B,) in nats, number of field evaluations); see `log_likelihood_stats`."""
    res = log_likelihood_stats(
        sde,
        score_fn,
        x,
        divergence=divergence,
        probe=probe,
        n_probes=n_probes,
        method=method,
        rtol=rtol,
        atol=atol,
        eps=eps,
        backend=backend,
        generator=generator,
        grad=grad,
    )
    return res.logp, res.nfe


@dataclass(frozen=True)
class SampleDensity:
    """x: (B, *D) samples at t = eps; logp: (B,) the model's log-density there (nats, the
    average over probes); nfe_per_point: (B,) evaluations each sample's solve took."""

    x: torch.Tensor
    logp: torch.Tensor
    nfe_per_point: torch.Tensor


def sample_log_density(
    sde: SDE,
    score_fn: ScoreFn,
    x_T: torch.Tensor,
    *,
    eps: float = 1e-3,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "exact",
    probe: str = "rademacher",
    n_probes: int = 1,
    generator=None,
) -> SampleDensity:
    """Sample by the PF ODE from x_T (B, *D) down to eps and integrate the divergence alongside:
    log p_eps(x_eps) = log pi(x_T) + int_eps^T div v(x_t, t) dt, the same identity `log_likelihood`
    integrates upwards, so the two agree on the same points to the solvers' tolerance. Per-point
    solves; Hutchinson probes (divergence="hutchinson", for images) from `generator`."""
    field, acc = _flow_with_divergence(
        sde, score_fn, x_T, divergence, probe, n_probes, eps, generator
    )
    with torch.no_grad():
        x, integral, nfe = _solve_perpoint(field, x_T, acc, (sde.T, eps), method, rtol, atol)
        # integral = int_T^eps div v dt = -int_eps^T div v dt
        logp = (sde.prior_logp(x_T) - integral).mean(0)
    return SampleDensity(x, logp, nfe)
