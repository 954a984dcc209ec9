"""Gaussian-mixture laws with exact densities: the closed-form references of the toolkit.

`GaussianMixture` is the law itself (density, sampling, conditionals); `gmm8` and `mixture5d` are
the two shipped instances. It sits in `data` so that every layer above may use it: data sets draw
from it, `models.exact` perturbs it by an SDE, `metrics` compares samples with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


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
            cache[device] = (
                self.means.to(device),
                self.variances.to(device),
                self.weights.log().to(device),
            )
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
        cond = (mean[rows, k] if mean.shape[0] == x.shape[0] else mean[0, k]) - xf[:, 0]
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

    def posterior(
        self, matrix: torch.Tensor, y: torch.Tensor, sigma_y: float
    ) -> FullCovarianceMixture:
        """The law of x given y = A x + sigma_y e, e ~ N(0, I), for x from this mixture.

        matrix: A, (m, D); y: (m,). Per component (Kalman's update): S = A C Aᵀ + sigma_y² I,
        G = C Aᵀ S⁻¹, mean mu + G (y - A mu), covariance C - G A C, and weight w N(y; A mu, S).
        With sigma_y = 0, A must have full row rank (else S is singular).
        """
        a, yv = matrix.double(), y.double().reshape(-1)
        if a.ndim != 2 or a.shape[1] != self.dim or yv.shape[0] != a.shape[0]:
            raise ValueError(
                f"need A of shape (m, {self.dim}) and y of shape (m,), got {tuple(a.shape)} "
                f"and {tuple(y.shape)}"
            )
        if sigma_y < 0:
            raise ValueError(f"sigma_y must be >= 0, got {sigma_y}")
        if sigma_y == 0 and int(torch.linalg.matrix_rank(a)) < a.shape[0]:
            raise ValueError("A C Aᵀ is singular: give A full row rank or sigma_y > 0")
        cov = torch.diag_embed(self.variances)  # (K, D, D)
        s = a @ cov @ a.T + sigma_y**2 * torch.eye(a.shape[0], dtype=torch.float64)
        chol, info = torch.linalg.cholesky_ex(s)
        if bool((info != 0).any()):
            raise ValueError("A C Aᵀ + sigma_y² I is singular: give A full row rank or sigma_y > 0")
        resid = yv - self.means @ a.T  # (K, m)
        gain = torch.cholesky_solve((cov @ a.T).transpose(-1, -2), chol).transpose(-1, -2)
        means = self.means + (gain @ resid.unsqueeze(-1)).squeeze(-1)
        covs = cov - gain @ a @ cov
        white = torch.linalg.solve_triangular(chol, resid.unsqueeze(-1), upper=False).squeeze(-1)
        log_n = -0.5 * white.square().sum(-1) - chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        log_w = self.weights.log() + log_n - 0.5 * a.shape[0] * math.log(2 * math.pi)
        return FullCovarianceMixture(torch.softmax(log_w, 0), means, covs)


class FullCovarianceMixture:
    """A mixture of K Gaussians with full covariances: weights (K,), means (K, D), covs (K, D, D).

    What a Gaussian mixture becomes once conditioned on a linear-Gaussian observation
    (`GaussianMixture.posterior`): the exact posterior that the inverse-problem samplers are
    scored against.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor) -> None:
        self.weights = weights.double() / weights.double().sum()
        self.means = means.double()
        self.covs = 0.5 * (covs.double() + covs.double().transpose(-1, -2))
        # a square root of each covariance by eigendecomposition: exact for singular ones too
        # (a noiseless observation leaves no variance along A's row space)
        lam, q = torch.linalg.eigh(self.covs)
        self._root = q * lam.clamp_min(0).sqrt().unsqueeze(-2)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws, (n, D) float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + (self._root[k] @ z.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log density of x: (N, D), (N,) float64 (the covariances must be non-singular)."""
        d = torch.distributions.MultivariateNormal(self.means, covariance_matrix=self.covs)
        return torch.logsumexp(d.log_prob(x.double().unsqueeze(1)) + self.weights.log(), dim=1)


def gmm8(radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
    """8 equal-weight isotropic Gaussians evenly spaced on a circle of the given radius."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(torch.full((8,), 1 / 8), means, std**2)


def mixture5d() -> GaussianMixture:
    """3 Gaussians in 5-D with unequal weights (0.5, 0.3, 0.2) and diagonal covariances."""
    means = torch.tensor(
        [
            [1.5, 0.0, -1.0, 0.5, 0.0],
            [-1.5, 1.0, 0.5, -0.5, 1.0],
            [0.0, -1.5, 1.0, 1.0, -1.0],
        ],
        dtype=torch.float64,
    )
    variances = torch.tensor(
        [
            [0.10, 0.20, 0.05, 0.15, 0.10],
            [0.20, 0.05, 0.10, 0.10, 0.25],
            [0.05, 0.10, 0.20, 0.05, 0.15],
        ],
        dtype=torch.float64,
    )
    return GaussianMixture([0.5, 0.3, 0.2], means, variances)
