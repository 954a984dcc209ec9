"""Closed-form score and log-density of a Gaussian mixture perturbed by any linear SDE.

If x_0 ~ sum_k w_k N(mu_k, diag(c_k)) and the SDE kernel is x_t = alpha(t) x_0 + sigma(t) z, then
    p_t(x) = sum_k w_k N(x; alpha mu_k, diag(alpha^2 c_k + sigma^2)),
    grad log p_t(x) = sum_k r_k(x) (alpha mu_k - x) / (alpha^2 c_k + sigma^2),
with responsibilities r_k(x) = softmax_k(log w_k + log N_k(x)). alpha and sigma come from the SDE's
`marginal_prob` alone, so this reference holds for every SDE in `sde_lib`.
"""

from __future__ import annotations

import torch
from torch import nn

from data.mixtures import GaussianMixture
from sde_lib import SDE


class MixtureScore(nn.Module):
    """The exact score of a Gaussian mixture under `sde`, usable wherever a trained model is.

    Calling it gives score_fn(x, t); `log_prob(x, t)` gives log p_t(x).
    """

    def __init__(self, sde: SDE, mixture: GaussianMixture) -> None:
        super().__init__()
        self.sde = sde
        self.mixture = mixture

    @property
    def n_classes(self) -> int:
        """The component label is the class: the exact model is conditional on it."""
        return self.mixture.n_components

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """score(x, t), or with labels y (B,) the conditional score of component y (y < 0 is the
        null class: the unconditional score)."""
        alpha, sigma = self.sde.alpha_sigma(t.double())
        if y is None:
            return self.mixture.score_at(x, alpha, sigma)
        return self.mixture.conditional_score_at(x, alpha, sigma, y)

    def log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.sde.alpha_sigma(t.double())
        return self.mixture.log_prob_at(x, alpha, sigma)


class MixtureClassifier(nn.Module):
    """The exact time-dependent classifier of a mixture's component label under `sde`:
    forward(x, t) -> log p_t(y | x), (B, K) (log-probabilities, usable as logits)."""

    def __init__(self, sde: SDE, mixture: GaussianMixture) -> None:
        super().__init__()
        self.sde = sde
        self.mixture = mixture
        self.n_classes = mixture.n_components

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.sde.alpha_sigma(t.double())
        return self.mixture.log_posterior_at(x, alpha, sigma).to(x.dtype)
