"""Shared pieces of the exponential-integrator solvers (DPM-Solver++, UniPC) in log-SNR time.

With lambda = log(alpha / sigma) and the data prediction x0(x, t) = (x + sigma_t^2 score) / alpha_t,
the probability-flow ODE of any linear SDE has, with h = lambda_s - lambda_t, the exact solution

    x_s = (sigma_s / sigma_t) x_t + alpha_s * int_0^h e^{-(h - tau)} x0(lambda_t + tau) dtau,

and int_0^h e^{-(h - tau)} tau^k / k! dtau = h^{k+1} phi_{k+1}(-h), with phi_0(z) = e^z and
phi_{k+1}(z) = (phi_k(z) - 1/k!) / z. Everything here is float64 Python arithmetic on scalars.
"""

from __future__ import annotations

import math

import torch

from sde_lib import SDE, ScoreFn

from .grids import Step


def phi(k: int, h: float) -> float:
    """phi_k(-h) = int_0^1 e^{-h (1 - u)} u^{k-1} / (k-1)! du for k >= 1 (h > 0 here)."""
    if abs(h) < 0.5:  # the recurrence cancels badly for small h: sum the series instead
        return sum((-h) ** n / math.factorial(n + k) for n in range(25))
    value = math.exp(-h)
    for j in range(k):
        value = (value - 1 / math.factorial(j)) / (-h)
    return value


def exp_weights(taus: list[float], h: float) -> list[float]:
    """Weights w_j with int_0^h e^{-(h - tau)} P(tau) dtau = sum_j w_j P(taus[j]) for polynomials P
    of degree < len(taus): the exact integral of the Lagrange interpolant through the nodes taus."""
    n = len(taus)
    moments = [math.factorial(k) * h ** (k + 1) * phi(k + 1, h) for k in range(n)]
    weights = []
    for j, tj in enumerate(taus):
        coef = [1.0]  # monomial coefficients of L_j(tau), lowest degree first
        for m, tm in enumerate(taus):
            if m != j:  # multiply by (tau - tm) / (tj - tm)
                d = tj - tm
                coef = [(b - tm * a) / d for a, b in zip([*coef, 0.0], [0.0, *coef], strict=True)]
        weights.append(sum(c * mk for c, mk in zip(coef, moments, strict=False)))
    return weights


def data_prediction(score_fn: ScoreFn, x: torch.Tensor, t: float, alpha: float, sigma: float):
    """x0(x, t) = (x + sigma^2 score(x, t)) / alpha: (B, *D) -> (B, *D), one score evaluation."""
    return (x + sigma**2 * score_fn(x, x.new_full((x.shape[0],), t))) / alpha


def tweedie_denoise(sde: SDE, score_fn: ScoreFn, x: torch.Tensor, t: float) -> torch.Tensor:
    """E[x_0 | x_t = x] = (x + sigma_t^2 score(x, t)) / alpha_t (Tweedie's formula): (B, *D)."""
    alpha, sigma = (v.item() for v in sde.alpha_sigma(torch.tensor([t], dtype=torch.float64)))
    return data_prediction(score_fn, x, t, alpha, sigma)


def lam(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma)."""
    return math.log(alpha) - math.log(sigma)


def sde_decay(st: Step, h: float, eta: float) -> float:
    """(sigma_s / sigma_t) e^(-eta h): the factor on x_t of a data-prediction step of the reverse
    SDE with noise scale eta (Lu et al. 2022; eta = 0: the probability-flow ODE's)."""
    return (st.sigma_s / st.sigma_t) * math.exp(-eta * h)


def step_h(st: Step) -> float:
    """h = lambda_s - lambda_t of one interval (> 0)."""
    return lam(st.alpha_s, st.sigma_s) - lam(st.alpha_t, st.sigma_t)


def step_order(i: int, steps: int, order: int, lower_order_final: bool) -> int:
    """Order of step i (0-based) of `steps`: warm-up 1, 2, ... and, if lower_order_final, at most
    steps - i on the last steps (so the final step is first order)."""
    p = min(order, i + 1)
    if lower_order_final:
        p = min(p, steps - i)
    return p
