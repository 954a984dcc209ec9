"""EDM's scaled variables (Karras et al. 2022), shared by the samplers written in them.

Every linear SDE is x~ = x_0 + s z in x~ = x / alpha and s = sigma / alpha, and its probability-flow
ODE is dx~ / ds = -s alpha score(x, t) = -sigma score(alpha x~, t): one ODE in s for all of them.
A point on the path is (t, alpha(t), sigma(t)) as Python floats.
"""

from __future__ import annotations

import torch

from sde_lib import ScoreFn

Point = tuple[float, float, float]  # (t, alpha(t), sigma(t))


def slope(score_fn: ScoreFn, xs: torch.Tensor, at: Point) -> torch.Tensor:
    """dx~ / ds at x~ = xs (B, *D) and the point `at`."""
    t, alpha, sigma = at
    return -sigma * score_fn(alpha * xs, xs.new_full((xs.shape[0],), t))


def heun_step(
    score_fn: ScoreFn, xs: torch.Tensor, here: Point, there: Point, second_order: bool = True
) -> torch.Tensor:
    """One step of the flow in s from `here` to `there`: Euler, then Heun's trapezoidal
    correction with the slope at the Euler point (2 evaluations; 1 with second_order=False)."""
    ds = there[2] / there[1] - here[2] / here[1]
    d = slope(score_fn, xs, here)
    euler = xs + ds * d
    if not second_order:
        return euler
    return xs + (0.5 * ds) * (d + slope(score_fn, euler, there))
