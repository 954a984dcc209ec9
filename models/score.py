"""Turn an architecture into a score model score_fn(x, t) for a given SDE (the parameterisation).

With x_t = alpha x_0 + sigma z, the network sees the input scaled to unit variance,
c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma^2) (the EDM preconditioning, written with the SDE's
own alpha and sigma), and predicts the noise z ("eps") or the score itself ("score"):
    eps:   score(x, t) = -net(c_in x, t) / sigma(t)
    score: score(x, t) =  net(c_in x, t)
Samplers and losses only ever see the score, so they never know which network they hold.
"""

from __future__ import annotations

import torch
from torch import nn

from sde_lib import SDE, append_dims

PARAMETERISATIONS = ("eps", "score")


class ScoreModel(nn.Module):
    def __init__(
        self, net: nn.Module, sde: SDE, parameterisation: str = "eps", sigma_data: float = 1.0
    ) -> None:
        super().__init__()
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(
                f"unknown parameterisation {parameterisation!r}; "
                f"allowed: {', '.join(PARAMETERISATIONS)}"
            )
        self.net = net
        self.sde = sde
        self.parameterisation = parameterisation
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, *D), t: (B,) in (0, T] -> score (B, *D)."""
        alpha, sigma = self.sde.alpha_sigma(t)
        c_in = (alpha.square() * self.sigma_data**2 + sigma.square()).rsqrt()
        out = self.net(append_dims(c_in.to(x.dtype), x.ndim) * x, t)
        if self.parameterisation == "eps":
            return -out / append_dims(sigma.to(x.dtype), x.ndim)
        return out
