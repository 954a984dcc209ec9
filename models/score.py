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
        # an SDE with trainable parts (sde=vdm: its noise schedule) is owned by the model, so the
        # optimiser, EMA, DDP and checkpoints hold it with the network
        if isinstance(getattr(sde, "module", None), nn.Module):
            self.schedule = sde.module
        self.parameterisation = parameterisation
        self.sigma_data = float(sigma_data)

    @property
    def n_classes(self) -> int:
        """Classes of a class-conditional network (0: unconditional)."""
        return int(getattr(self.net, "n_classes", 0))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, *D), t: (B,) in (0, T] -> score (B, *D); y: (B,) class labels of a
        conditional network (None or -1: the null class, i.e. the unconditional score)."""
        alpha, sigma = self.sde.alpha_sigma(t)
        c_in = (alpha.square() * self.sigma_data**2 + sigma.square()).rsqrt()
        inp = append_dims(c_in.to(x.dtype), x.ndim) * x
        # the network's noise-level input: t, or what the SDE says (vdm: the normalised gamma(t))
        tn = self.sde.net_time(t, alpha, sigma) if hasattr(self.sde, "net_time") else t
        out = self.net(inp, tn) if y is None else self.net(inp, tn, y)
        if self.parameterisation == "eps":
            return -out / append_dims(sigma.to(x.dtype), x.ndim)
        return out
