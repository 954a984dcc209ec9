"""Divergence of a vector field x -> v(x), exactly or by Hutchinson's estimator.

Both read the divergence off vector-Jacobian products u^T (dv/dx) of one forward pass per field
evaluation: up to LOOP_COTANGENTS cotangents u by one `torch.autograd.grad` each, more batched
over u with `torch.func.vjp` and `torch.func.vmap`:

    exact:       div v(x) = sum_i e_i^T J e_i               (D products, one per basis vector)
    Hutchinson:  div v(x) = E_u[u^T J u],  E[u u^T] = I     (Hutchinson 1989; Grathwohl 2019)

Probes u are Gaussian N(0, I) or Rademacher (+-1 with equal odds). With S = (J + J^T) / 2 the
variance of one estimate is 2 ||S||_F^2 (Gaussian) or 2 (||S||_F^2 - sum_i S_ii^2) (Rademacher),
so Rademacher probes are never worse.
A field maps (B, *D) -> (B, *D) and must treat the B examples independently.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.func import vjp, vmap

from sde_lib import as_noise

Field = Callable[[torch.Tensor], torch.Tensor]
PROBES = ("gaussian", "rademacher")


# up to this many cotangents are pulled back one autograd call each (retaining the graph);
# more go through one batched call. For a few cotangents (a 2-D trace, one Hutchinson probe) the
# plain calls skip the batching machinery, which costs about as much as a small field itself.
LOOP_COTANGENTS = 8


def _vjps(
    fn: Field, x: torch.Tensor, cotangents: torch.Tensor, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """v = fn(x): (B, *D) and u^T (dv/dx) for each of the P cotangents u: (P, B, *D).
    create_graph: both stay differentiable (in x's history and in fn's parameters)."""
    if cotangents.shape[0] > LOOP_COTANGENTS and not create_graph:
        with torch.enable_grad():
            v, pullback = vjp(fn, x)
            (products,) = vmap(pullback)(cotangents)
        return v, products
    with torch.enable_grad():
        y = x if create_graph and x.requires_grad else x.detach().requires_grad_(True)
        v = fn(y)
        if not v.requires_grad:  # a field that does not depend on x (e.g. VE's drift)
            return v, torch.zeros_like(cotangents)
        last = cotangents.shape[0] - 1
        products = torch.stack(
            [
                torch.autograd.grad(
                    v, y, u, retain_graph=create_graph or i < last,
                    create_graph=create_graph, materialize_grads=True,
                )[0]
                for i, u in enumerate(cotangents)
            ]
        )  # fmt: skip
    return (v, products) if create_graph else (v.detach(), products)


def exact_divergence(
    fn: Field, x: torch.Tensor, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x): (B, *D) and its exact divergence tr(d fn / dx) per example: (B,).

    Costs one evaluation and D batched vector-Jacobian products, so it suits low-dimensional data.
    create_graph: differentiable results (D products one at a time).
    """
    b, d = x.shape[0], math.prod(x.shape[1:])
    basis = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:])
    v, rows = _vjps(fn, x, basis.expand(d, b, *x.shape[1:]), create_graph)  # rows[i, b] = e_i^T J_b
    return v, torch.diagonal(rows.reshape(d, b, d), dim1=0, dim2=2).sum(-1)


def hutchinson_divergence(
    fn: Field, x: torch.Tensor, probes: torch.Tensor, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x): (B, *D) and one estimate u^T J u per probe u: (P, B, *D), so (P, B)."""
    if probes.shape[1:] != x.shape:
        raise ValueError(f"probes must be (P, *{tuple(x.shape)}), got {tuple(probes.shape)}")
    v, products = _vjps(fn, x, probes, create_graph)
    return v, (products * probes).flatten(2).sum(-1)


def draw_probes(
    kind: str,
    n_probes: int,
    like: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n_probes probes per example of `like` (B, *D): (n_probes, B, *D), with E[u u^T] = I."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; allowed: {', '.join(PROBES)}")
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    noise = as_noise(generator)
    # drawn per example (B first), so that keyed noise gives a point the same probes in any batch
    shape = (like.shape[0], n_probes, *like.shape[1:])
    if kind == "gaussian":
        u = noise.randn(shape, dtype=like.dtype, device=like.device)
    else:
        u = noise.randint(2, shape, device=like.device).to(like.dtype) * 2 - 1
    return u.transpose(0, 1)
