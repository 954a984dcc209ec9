"""Sample-quality measures against a known law: two-sample distances and mixture-weight recovery.

`mmd` (a kernel two-sample distance) and `sliced_wasserstein` compare two samples of any size.
Both are positive even for two samples of one law (about 1 / sqrt(N)), so compare a sampler's
distance to fresh data with the fresh-vs-fresh distance at the same sample size. MMD with a few
bandwidths is the steadier of the two: its fresh-vs-fresh spread is about half that of SW_2.
`component_weights` assigns each sample to the mixture component of largest responsibility and
returns the fractions, to be compared with the mixture weights (binomial standard errors from
`weight_z_scores`). Assignment recovers the weights only where the components barely overlap,
which holds for `gmm8` and `mixture5d` (misassignment of exact draws is below 1e-4).
"""

from __future__ import annotations

import math

import torch

from data.mixtures import GaussianMixture


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, n_projections: int = 256, seed: int = 0
) -> float:
    """Sliced Wasserstein-2 distance between the empirical laws of x: (N, *D) and y: (M, *D).

    SW_2(x, y)^2 = mean over unit directions u of W_2^2(<x, u>, <y, u>), with `n_projections`
    directions drawn uniformly on the sphere from `seed` (the same for every call), and the 1-D
    W_2 computed from sorted projections (quantiles interpolated linearly when N != M).
    Computed in float64. Returns SW_2 (same units as the data).
    """
    xf, yf = x.flatten(1).double(), y.flatten(1).double()
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"samples differ in dimension: {xf.shape[1]} vs {yf.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(xf.shape[1], n_projections, generator=g, dtype=torch.float64)
    u = (u / u.norm(dim=0, keepdim=True)).to(xf.device)
    px, py = (xf @ u).sort(dim=0).values, (yf @ u).sort(dim=0).values
    if px.shape[0] != py.shape[0]:
        n = max(px.shape[0], py.shape[0])
        px, py = _quantiles(px, n), _quantiles(py, n)
    return math.sqrt((px - py).square().mean().item())


def mmd(
    x: torch.Tensor, y: torch.Tensor, bandwidth: float = 1.0, n_scales: int = 4, chunk: int = 1024
) -> float:
    """Maximum mean discrepancy between the empirical laws of x: (N, *D) and y: (M, *D).

    Kernel: the mean of Gaussian kernels exp(-|a - b|^2 / (2 h_j^2)) over the dyadic bandwidths
    h_j = bandwidth / 2^j, j = 0 .. n_scales - 1 (default 1, 1/2, 1/4, 1/8, in data units); with
    e = exp(-|a - b|^2 / (2 h_0^2)) they are e, e^4, e^16, ..., so one exp serves all scales.
    Returns the square root of the biased (V-statistic) estimate
    MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y), computed in float64 in row chunks.
    """
    xf, yf = x.flatten(1).double(), y.flatten(1).double()
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"samples differ in dimension: {xf.shape[1]} vs {yf.shape[1]}")

    def mean_k(a: torch.Tensor, b: torch.Tensor) -> float:
        total = 0.0
        for i in range(0, a.shape[0], chunk):
            e = torch.cdist(a[i : i + chunk], b).square_().mul_(-0.5 / bandwidth**2).exp_()
            for j in range(n_scales):
                total += e.sum().item()
                if j + 1 < n_scales:
                    e = e.square_().square_()
        return total / (n_scales * a.shape[0] * b.shape[0])

    return math.sqrt(max(mean_k(xf, xf) + mean_k(yf, yf) - 2 * mean_k(xf, yf), 0.0))


def _quantiles(p: torch.Tensor, n: int) -> torch.Tensor:
    """Linear interpolation of sorted columns p: (M, P) at n mid-point quantile levels: (n, P)."""
    m = p.shape[0]
    pos = ((torch.arange(n, dtype=torch.float64, device=p.device) + 0.5) * (m / n) - 0.5).clamp(
        0, m - 1
    )
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(m - 1)
    w = (pos - lo).unsqueeze(1)
    return p[lo] * (1 - w) + p[hi] * w


def assign_components(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Index of the component of largest responsibility for each sample x: (N, *D) -> (N,)."""
    xf = x.flatten(1).double().unsqueeze(1)  # (N, 1, D)
    mu, var = mixture.means.to(xf.device), mixture.variances.to(xf.device)  # (K, D)
    log_n = -0.5 * ((xf - mu).square() / var + var.log()).sum(-1)  # log N_k(x) + const, (N, K)
    return (mixture.weights.to(xf.device).log() + log_n).argmax(dim=1)


def component_weights(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Fraction of the samples x: (N, *D) assigned to each component: (K,) float64."""
    labels = assign_components(mixture, x).cpu()
    return torch.bincount(labels, minlength=mixture.n_components).double() / x.shape[0]


def weight_z_scores(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """(fraction_k - w_k) / sqrt(w_k (1 - w_k) / N) per component: (K,) float64.

    Under exact sampling each entry is approximately standard normal (binomial standard error).
    """
    w = mixture.weights
    return (component_weights(mixture, x) - w) / (w * (1 - w) / x.shape[0]).sqrt()
