"""Nearest-neighbour measures: precision/recall with k-NN manifolds, and memorisation.

Precision and recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric for
assessing generative models"). Each point phi' of a set Phi gets the radius r_k(phi') = distance to
its k-th nearest neighbour in Phi (itself excluded); the manifold estimate of Phi is the union of
the balls B(phi', r_k(phi')), and f(phi, Phi) = 1 when phi lies in some ball. Then

    precision = mean over samples phi_g of f(phi_g, Phi_real)   (samples on the data manifold)
    recall    = mean over real phi_r of f(phi_r, Phi_samples)   (data covered by the samples),

with k = 3 as in the paper. Identical sets give 1 and 1; sets far apart give 0 and 0.

Memorisation share: the share of samples whose nearest training point is closer than the 1st
percentile of the held-out-to-training nearest-neighbour distances, i.e. closer to a training image
than all but 1 % of genuinely new images are. For held-out data the share is about 0.01 by
construction; for copies of training images it is about 1.
"""

from __future__ import annotations

import numpy as np
import torch


def _flat(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    return t.detach().cpu().reshape(t.shape[0], -1).double()


def nearest(query, ref, chunk: int = 1024, exclude_self: bool = False):
    """Distance to and index of the nearest row of ref (M, D) for each query row (N, D).

    Returns (dist (N,) float64, index (N,) int64). With exclude_self (query is ref) the point
    itself is skipped. Computed in row chunks with torch.cdist in float64.
    """
    q, r = _flat(query), _flat(ref)
    dists, idx = [], []
    for i in range(0, q.shape[0], chunk):
        d = torch.cdist(q[i : i + chunk], r)
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + i] = float("inf")
        v, j = d.min(dim=1)
        dists.append(v)
        idx.append(j)
    return torch.cat(dists), torch.cat(idx)


def kth_neighbour_radii(x, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance of each row of x (N, D) to its k-th nearest other row: (N,) float64; N > k."""
    f = _flat(x)
    if f.shape[0] <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii; got {f.shape[0]}")
    out = []
    for i in range(0, f.shape[0], chunk):
        d = torch.cdist(f[i : i + chunk], f)
        # the k+1 smallest include the point itself at distance 0
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def _coverage(points, manifold, radii, chunk: int = 1024) -> torch.Tensor:
    """f(phi, Phi) for each point: 1.0 where some |phi - phi'| <= r_k(phi'), else 0.0; (N,)."""
    p, m = _flat(points), _flat(manifold)
    out = []
    for i in range(0, p.shape[0], chunk):
        d = torch.cdist(p[i : i + chunk], m)
        out.append((d <= radii.unsqueeze(0)).any(dim=1).double())
    return torch.cat(out)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of fake (M, D) against real (N, D) features, k-NN balls."""
    r_real, r_fake = kth_neighbour_radii(real, k), kth_neighbour_radii(fake, k)
    precision = float(_coverage(fake, real, r_real).mean())
    recall = float(_coverage(real, fake, r_fake).mean())
    return precision, recall


def memorisation(samples, train, heldout, percentile: float = 1.0) -> dict:
    """Memorisation share of samples (N, ...) against train (M, ...), threshold from heldout.

    Returns {"share": float, "threshold": the `percentile`-th percentile of held-out-to-train
    nearest distances, "nn_index": (N,) index of each sample's nearest training row,
    "nn_distance": (N,) its distance}. All three sets must be in the same space and units.
    """
    d_held, _ = nearest(heldout, train)
    threshold = float(np.percentile(d_held.numpy(), percentile))
    d, idx = nearest(samples, train)
    return {
        "share": float((d < threshold).double().mean()),
        "threshold": threshold,
        "nn_index": idx,
        "nn_distance": d,
    }
