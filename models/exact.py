"""Closed-form score and log-density of a Gaussian mixture perturbed by any linear SDE.

If x_0 ~ sum_k w_k N(mu_k, diag(c_k)) and the SDE kernel is x_t = alpha(t) x_0 + sigma(t) z, then
    p_t(x) = sum_k w_k N(x; alpha mu_k, diag(alpha^2 c_k + sigma^2)),
    grad log p_t(x) = sum_k r_k(x) (alpha mu_k - x) / (alpha^2 c_k + sigma^2),
with responsibilities r_k(x) = softmax_k(log w_k + log N_k(x)). alpha and sigma come from the SDE's
`marginal_prob` alone, so this reference holds for every SDE in `sde_lib`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sde_lib import SDE


class GaussianMixture:
    """A mixture of K Gaussians with diagonal covariances in D dimensions (data shape `shape`).

    weights: (K,), positive (normalised here); means: (K, D);
    variances: a scalar, (K,) isotropic per component, or (K, D) diagonal.
    """

    def __init__(
        self,
        weights: Sequence[float] | torch.Tensor,
        means: Sequence[Sequence[float]] | torch.Tensor,
        variances: float | Sequence | torch.Tensor,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim != 2 or w.ndim != 1 or w.shape[0] != mu.shape[0]:
            raise ValueError("need weights (K,) and means (K, D) with the same K")
        if (w <= 0).any():
            raise ValueError("mixture weights must be positive")
        var = torch.as_tensor(variances, dtype=torch.float64)
        var = var.reshape(-1, 1) if var.ndim == 1 else var
        var = torch.broadcast_to(var, mu.shape).clone()
        if (var <= 0).any():
            raise ValueError("mixture variances must be positive")
        self.weights = w / w.sum()
        self.means = mu
        self.variances = var
        self.dim = mu.shape[1]
        self.shape = tuple(shape) if shape is not None else (self.dim,)
        if math.prod(self.shape) != self.dim:
            raise ValueError(f"shape {self.shape} does not hold {self.dim} values")

    @property
    def n_components(self) -> int:
        return self.weights.shape[0]

    def sample(
        self, n: int, generator: torch.Generator | None = None, return_labels: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """n draws, shape (n, *shape), float32."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (self.means[k] + self.variances[k].sqrt() * z).float().reshape(n, *self.shape)
        return (x, k) if return_labels else x

    def _components(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """Per-component log N_k(x) + log w_k: (B, K), and the (B, K, D) means and variances."""
        xf = x.reshape(x.shape[0], 1, -1).double()
        a = alpha.double().reshape(-1, 1, 1)
        s = sigma.double().reshape(-1, 1, 1)
        means, variances, log_w = self._on(xf.device)
        mean = a * means
        var = a.square() * variances + s.square()
        logn = -0.5 * ((xf - mean).square() / var + torch.log(2 * math.pi * var)).sum(-1)
        return logn + log_w, xf, mean, var

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(means, variances, log weights) on `device`, copied there once (no host-to-device
        copy per score evaluation)."""
        cache = self.__dict__.setdefault("_device_cache", {})
        if device not in cache:
            cache[device] = (self.means.to(device), self.variances.to(device),
                             self.weights.log().to(device))  # fmt: skip
        return cache[device]

    def log_prob_at(
        self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """log p_t(x), (B,), for the law of alpha x_0 + sigma z (alpha, sigma: (B,))."""
        logj, *_ = self._components(x, alpha, sigma)
        return torch.logsumexp(logj, dim=1).to(x.dtype)

    def score_at(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x), shaped like x."""
        logj, xf, mean, var = self._components(x, alpha, sigma)
        r = torch.softmax(logj, dim=1).unsqueeze(-1)
        return (r * (mean - xf) / var).sum(1).reshape(x.shape).to(x.dtype)

    def component(self, k: int) -> GaussianMixture:
        """The law of the draws of component k (the conditional law given the label y = k)."""
        if not 0 <= int(k) < self.n_components:
            raise ValueError(f"component {k} out of range 0..{self.n_components - 1}")
        k = int(k)
        return GaussianMixture([1.0], self.means[k : k + 1], self.variances[k : k + 1], self.shape)

    def log_posterior_at(
        self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """log p_t(y = k | x), (B, K): the responsibilities under the perturbed mixture, i.e. the
        exact time-dependent classifier of the component label."""
        logj, *_ = self._components(x, alpha, sigma)
        return torch.log_softmax(logj, dim=1)

    def conditional_score_at(
        self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """grad_x log p_t(x | y): the score of the perturbed component y_i for row i (a Gaussian,
        N(alpha mu_y, alpha^2 c_y + sigma^2)); rows with y < 0 get the unconditional score."""
        _, xf, mean, var = self._components(x, alpha, sigma)
        y = y.to(xf.device).long()
        rows = torch.arange(x.shape[0], device=xf.device)
        k = y.clamp_min(0)
        cond = ((mean[rows, k] if mean.shape[0] == x.shape[0] else mean[0, k]) - xf[:, 0])
        cond = cond / (var[rows, k] if var.shape[0] == x.shape[0] else var[0, k])
        cond = cond.reshape(x.shape).to(x.dtype)
        if bool((y >= 0).all()):
            return cond
        uncond = self.score_at(x, alpha, sigma)
        return torch.where((y >= 0).reshape(-1, *[1] * (x.ndim - 1)), cond, uncond)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log density of the data law itself, (B,)."""
        one = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        return self.log_prob_at(x, one, torch.zeros_like(one))

    def conditional(self, known: torch.Tensor, mask: torch.Tensor) -> GaussianMixture:
        """The law of the unknown coordinates given x[mask] = known[mask] (one example, flat)."""
        m = mask.reshape(-1).bool()
        xk = known.reshape(-1).double()[m]
        var_k = self.variances[:, m]
        logn = -0.5 * ((xk - self.means[:, m]).square() / var_k + torch.log(2 * math.pi * var_k))
        logw = self.weights.log() + logn.sum(-1)
        return GaussianMixture(torch.softmax(logw, 0), self.means[:, ~m], self.variances[:, ~m])


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
