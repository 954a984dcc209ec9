"""Changing the probability path after training (flow_matching's ScheduleTransformedModel, in
score form): a score model of one linear SDE used on another.

Two paths x = alpha(t) x_0 + sigma(t) z that pass through the same signal-to-noise ratio
lambda = log(alpha / sigma) differ only by a scale: if lambda_B(t) = lambda_A(t'), then
x_A = c x_B with c = alpha_A(t') / alpha_B(t) (= sigma_A(t') / sigma_B(t)) has path A's law at t',
so
    score_B(x, t) = c score_A(c x, t').
DDPM (VP), EDM (VE), sub-VP, rectified flow and the trigonometric path are all one family in
these coordinates. c is taken as the ratio of the sigmas (equal to that of the alphas where the
SNRs agree): where path B's SNR leaves path A's range (for example near rectified flow's end,
lambda(0.999) = -6.9 against VP's -5.0 at t = 1), t' is clamped to A's end and the noise levels
still match, so only the already negligible signal is misjudged; the score is exact only where
`in_range` says so.
"""

from __future__ import annotations

import torch

from sde_lib import SDE, ScoreFn, append_dims

from .grids import log_snr, t_from_log_snr


class ChangedPath:
    """score_fn of `source` as the score of `target`: call it as score(x, t) with t on target."""

    def __init__(self, score_fn: ScoreFn, source: SDE, target: SDE, eps: float = 1e-5) -> None:
        self.score_fn, self.source, self.target, self.eps = score_fn, source, target, float(eps)
        ends = torch.tensor([source.T, self.eps], dtype=torch.float64)
        self.lam_lo, self.lam_hi = log_snr(source, ends).tolist()

    def source_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t' on the source path with the target's SNR at t, c = sigma_A(t') / sigma_B(t))."""
        lam = log_snr(self.target, t.double()).clamp(self.lam_lo, self.lam_hi)
        t_src = t_from_log_snr(self.source, lam, self.source.T, self.eps)
        _, s_src = self.source.alpha_sigma(t_src)
        _, s_tgt = self.target.alpha_sigma(t.double())
        return t_src, s_src / s_tgt

    def in_range(self, t: torch.Tensor) -> torch.Tensor:
        """Whether the target's SNR at t lies on the source path (where the score is exact)."""
        lam = log_snr(self.target, t.double())
        return (lam >= self.lam_lo) & (lam <= self.lam_hi)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *extra) -> torch.Tensor:
        t_src, c = self.source_time(t)
        c = append_dims(c.to(x.dtype), x.ndim)
        return c * self.score_fn(c * x, t_src.to(t.dtype), *extra)
