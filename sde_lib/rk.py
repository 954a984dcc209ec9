"""Embedded Runge-Kutta pairs with one step size per point (Hairer, Norsett & Wanner, Solving
Ordinary Differential Equations I, Sec. II.4 and II.5).

A batch of B independent initial value problems dy_i/dt = f(t_i, y_i), y_i(t0) = y0_i, is solved
as B separate solves that happen to share the evaluations of f: each row has its own step size,
its own error estimate and its own accept / reject decision, and rows that have reached t1 leave
the batch. So a row's result depends on nothing but its own initial value, f and the tolerances
(up to the rounding of f itself, which may differ with the number of rows it is evaluated with).
A shared step size, as in torchdiffeq, makes every row take the steps the batch's error norm
asks for: a point's value then moves with its batch-mates and one hard point slows all of them.

Error control as in Hairer & Wanner (and torchdiffeq): per row, the RMS over components of
err / (atol + rtol max(|y_n|, |y_n+1|)), maxed over the given column groups (so that a small
group, e.g. a log-density accumulator beside an image, is not drowned by the large one); a step
is accepted when that is <= 1, and the next step is h (0.9 err^(-1/(q+1))) clipped to
[0.2 h, 10 h] (no growth after a rejection), q the order of the embedded error estimate. The
first step size is chosen per row by Hairer & Wanner's algorithm (II.4, p. 169), capped at the
span so that f is never evaluated outside [t0, t1].

With autograd enabled the solution is differentiable in y0 and in whatever f closes over
(parameters): the gradient of the computed solution, by backpropagation through the steps; the
step sizes themselves are held fixed (detached), as is usual for discretise-then-optimise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# f(t: (b,), y: (b, N), rows: (b,) indices of these rows in the batch) -> (b, N), rows independent
RowField = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Tableau:
    """An explicit embedded pair with the first-same-as-last property: the last stage is
    evaluated at (t + h, y_n+1), so an accepted step's last stage is the next step's first."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]  # a[i] = coefficients of stages 0..i for stage i + 1
    b: tuple[float, ...]  # the solution's weights (the last stage's weight is 0: FSAL)
    b_err: tuple[float, ...]  # b - b_hat, the error estimate's weights over all stages
    error_order: int  # q: the error estimate is O(h^(q+1))


# Dormand & Prince 1980, RK5(4)7FM (Hairer & Wanner, Table II.5.2)
DOPRI5 = Tableau(
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_err=(
        35 / 384 - 5179 / 57600,
        0.0,
        500 / 1113 - 7571 / 16695,
        125 / 192 - 393 / 640,
        -2187 / 6784 + 92097 / 339200,
        11 / 84 - 187 / 2100,
        -1 / 40,
    ),
    error_order=4,
)

# Bogacki & Shampine 1989, RK3(2)
BOSH3 = Tableau(
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    a=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_err=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    error_order=2,
)

TABLEAUS = {"dopri5": DOPRI5, "bosh3": BOSH3}


@dataclass(frozen=True)
class PerPointSolution:
    """y1: (B, N) at t1; nfe: (B,) evaluations of f each row took (its own solve's count);
    steps / rejected: (B,) accepted and rejected steps per row."""

    y1: torch.Tensor
    nfe: torch.Tensor
    steps: torch.Tensor
    rejected: torch.Tensor


def _norm(v: torch.Tensor, groups: Sequence[slice]) -> torch.Tensor:
    """Per row: the max over column groups of the RMS within the group: (b, N) -> (b,)."""
    return torch.stack([v[:, g].square().mean(1).sqrt() for g in groups]).amax(0)


def _initial_step(f, rows, t0, y0, f0, direction, span, order, rtol, atol, groups):
    """Hairer & Wanner's starting step size per row (one more evaluation of f), capped at the
    span so that no evaluation leaves [t0, t1]."""
    scale = atol + rtol * y0.abs()
    d0, d1 = _norm(y0 / scale, groups), _norm(f0 / scale, groups)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.minimum(h0, span)
    f1 = f(t0 + direction * h0, y0 + (direction * h0).to(y0.dtype)[:, None] * f0, rows)
    d2 = _norm((f1 - f0) / scale, groups) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(
        dmax <= 1e-15,
        torch.clamp(h0 * 1e-3, min=1e-6),
        (0.01 / dmax.clamp_min(1e-300)) ** (1.0 / (order + 1)),
    )
    return torch.minimum(torch.minimum(100 * h0, h1), span)


def solve_per_point(
    f: RowField,
    y0: torch.Tensor,
    t0: float,
    t1: float,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    groups: Sequence[slice] | None = None,
    max_steps: int = 100_000,
) -> PerPointSolution:
    """Solve B independent problems from t0 to t1 (either direction), each with its own step
    size control; y0: (B, N). groups: column slices whose RMS errors are maxed (None: one group
    of all columns). RuntimeError if a row needs more than max_steps attempts or its step
    underflows."""
    if method not in TABLEAUS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(TABLEAUS)}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"need rtol > 0 and atol > 0, got rtol={rtol}, atol={atol}")
    if y0.ndim != 2:
        raise ValueError(f"y0 must be (B, N), got shape {tuple(y0.shape)}")
    tab = TABLEAUS[method]
    groups = list(groups) if groups is not None else [slice(None)]
    b, dev, dt = y0.shape[0], y0.device, y0.dtype
    direction = 1.0 if t1 >= t0 else -1.0
    span_total = abs(t1 - t0)
    opts = dict(dtype=torch.float64, device=dev)

    def field(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return f(t.to(dt), y, rows)

    t = torch.full((b,), float(t0), **opts)
    y = y0
    nfe = torch.zeros(b, dtype=torch.long, device=dev)
    steps, rejected = torch.zeros_like(nfe), torch.zeros_like(nfe)
    every = torch.arange(b, device=dev)
    k_first = field(t, y, every)
    with torch.no_grad():
        h = _initial_step(
            field, every, t, y.detach(), k_first.detach(), direction,
            torch.full((b,), span_total, **opts), tab.error_order, rtol, atol, groups,
        )  # fmt: skip
    nfe += 2
    active = every
    if span_total == 0:
        active = active[:0]
    end = torch.full((b,), float(t1), **opts)
    for _ in range(max_steps):
        if active.numel() == 0:
            return PerPointSolution(y, nfe, steps, rejected)
        ta, ya, ka = t[active], y[active], k_first[active]
        remaining = (end[active] - ta).abs()
        last = h[active] >= remaining
        ha = torch.where(last, remaining, h[active])
        hs = (direction * ha).to(dt)[:, None]
        t_new = torch.where(last, end[active], ta + direction * ha)  # lands on t1 exactly
        ks = [ka]
        for ci, row in zip(tab.c[1:], tab.a, strict=True):
            yi = ya + hs * sum(aij * kj for aij, kj in zip(row, ks, strict=False) if aij != 0)
            ks.append(field(t_new if ci == 1.0 else ta + direction * ci * ha, yi, active))
        y_new = ya + hs * sum(bi * ki for bi, ki in zip(tab.b, ks, strict=True) if bi != 0)
        nfe[active] += len(tab.c) - 1
        with torch.no_grad():
            err = hs * sum(
                ei * ki.detach() for ei, ki in zip(tab.b_err, ks, strict=True) if ei != 0
            )
            scale = atol + rtol * torch.maximum(ya.detach().abs(), y_new.detach().abs())
            e = _norm(err / scale, groups).double()
            accept = e <= 1
            factor = torch.where(
                e == 0,
                torch.full_like(e, 10.0),
                0.9 * e.clamp_min(1e-300) ** (-1 / (tab.error_order + 1)),
            ).clamp(0.2, 10.0)
            factor = torch.where(accept, factor, factor.clamp_max(1.0))
            h_next = ha * factor
        if not bool(torch.isfinite(e).all()):
            raise RuntimeError("the ODE's field returned a non-finite value")
        acc = active[accept]
        t = t.index_copy(0, acc, t_new[accept])
        y = y.index_copy(0, acc, y_new[accept])
        k_first = k_first.index_copy(0, acc, ks[-1][accept])
        h = h.index_copy(0, active, h_next)
        steps[acc] += 1
        rejected[active[~accept]] += 1
        if bool((h_next[~accept] < 1e-14 * max(span_total, 1.0)).any()):
            raise RuntimeError("the step size underflowed: the ODE is too stiff for this tolerance")
        active = active[~(accept & last)]
    raise RuntimeError(f"more than max_steps={max_steps} step attempts")
