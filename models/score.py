"""Turn an architecture into a score model score_fn(x, t) for a given SDE (the parameterisation).

With x_t = alpha x_0 + sigma z, the network sees the input scaled to unit variance,
c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma^2) (the EDM preconditioning, written with the SDE's
own alpha and sigma), and predicts (F = net(c_in x, t)):
    eps:   the noise z,                 score = -F / sigma
    score: the score itself,            score = F
    x0:    the data x_0 (a denoiser),   score = (alpha F - x) / sigma^2
    v:     v = alpha z - sigma x_0 (Salimans & Ho 2022); inverting (x, v) -> (x_0, z),
           score = -(sigma x + alpha F) / (sigma (alpha^2 + sigma^2))
    flow:  the path's velocity u = alpha' x_0 + sigma' z (flow matching); inverting (x, u),
           z = (alpha F - alpha' x) / (alpha sigma' - sigma alpha'), score = -z / sigma,
           with alpha' = f alpha and sigma' = (2 f sigma^2 + g^2) / (2 sigma) read off the SDE's
           drift f(t) x and diffusion g(t).
Every rule is exact for any linear SDE. Samplers and losses only ever see the score, so they never
know which network they hold. ScoreSDEModel, EDMPrecondModel and EDMVPModel below are the
conventions of released networks (score_sde, EDM).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sde_lib import SDE, append_dims

PARAMETERISATIONS = ("eps", "score", "x0", "v", "flow")


class _ScoreWrapper(nn.Module):
    """What every score wrapper shares: the network's class count."""

    net: nn.Module

    @property
    def n_classes(self) -> int:
        """Classes of a class-conditional network (0: unconditional)."""
        return int(getattr(self.net, "n_classes", 0))


class ScoreModel(_ScoreWrapper):
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
        kind = self.parameterisation
        if kind == "score":
            return out
        a, s = (append_dims(v.to(x.dtype), x.ndim) for v in (alpha, sigma))
        if kind == "eps":
            return -out / s
        if kind == "x0":
            return (a * out - x) / s.square()
        if kind == "v":
            return -(s * x + a * out) / (s * (a.square() + s.square()))
        da, ds = (append_dims(v.to(x.dtype), x.ndim) for v in self.rates(t, alpha, sigma))
        return -(a * out - da * x) / ((a * ds - s * da) * s)

    def rates(self, t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """(d alpha / dt, d sigma / dt) from the SDE dx = f(t) x dt + g(t) dw: alpha' = f alpha,
        d sigma^2 / dt = 2 f sigma^2 + g^2."""
        drift, g = self.sde.sde(torch.ones_like(t)[:, None], t)
        f = drift[:, 0]
        return f * alpha, (2 * f * sigma.square() + g.square()) / (2 * sigma)


class ScoreSDEModel(_ScoreWrapper):
    """A network under score_sde's conventions (Song et al. 2021, `models/utils.get_score_fn`).

    VP and sub-VP (`process` "vp" / "subvp"): the network sees the time step label (N - 1) t and
    predicts the noise, so
        score(x, t) = -net(x, (N - 1) t) / std(t),
    with std(t) the marginal std (continuous training) or, for discretely trained VP models,
    DDPM's sqrt(1 - alphabar_i) at i = floor((N - 1) t) of the N-level table beta_i =
    linspace(beta_min / N, beta_max / N).
    VE: the network sees the noise level sigma(t) (continuous; NCSN++ embeds its log) or the level
    index i = round((1 - t)(N - 1)) of the geometric table from sigma_max down to sigma_min
    (discrete), and with `scale_by_sigma` divides its output by that sigma:
        score(x, t) = net(x, sigma) / sigma.

    Every noise level is computed as score_sde computes it, in the input's precision: its VP std
    sqrt(1 - exp(2 log alpha)) loses digits at small t in float32 (0.6 % at t = 1e-5), but the
    network was trained on x_t = alpha x_0 + std z with that very std, so its noise prediction
    is a score only when divided by it. VE's sigma(t) = sigma_min (sigma_max / sigma_min)^t is
    score_sde's noise level, not the exact kernel std sqrt(sigma(t)^2 - sigma_min^2) of
    `sde_lib.VESDE`; the network was trained with it.

    `centered=False`: the network was trained on data in [0, 1] (it maps its input to 2x - 1 as
    its first step, so it sees the toolkit's [-1, 1] data unchanged). In [-1, 1] coordinates the
    same VE process has every sigma doubled (the `sde` given here, in the toolkit's space, has
    sigma_min = 2 x 0.01 for score_sde's cifar10 configs) and the score halves; the network's
    noise label is its own sigma, half the toolkit's. A VP process on [0, 1] data is not a VP
    process on [-1, 1] (the mean shift is not scaled by alpha), so that combination is refused.
    """

    PROCESSES = ("vp", "subvp", "ve")

    def __init__(
        self,
        net: nn.Module,
        sde: SDE,
        process: str,
        *,
        continuous: bool = True,
        n_levels: int = 1000,
        centered: bool = True,
        scale_by_sigma: bool = False,
    ) -> None:
        super().__init__()
        if process not in self.PROCESSES:
            raise ValueError(
                f"score_sde's networks are trained for sde=vp|subvp|ve, not sde={process}"
            )
        if process != "ve" and not centered:
            raise ValueError(
                "a VP / sub-VP network trained on data in [0, 1] (centered=false) has no VP "
                "counterpart on the toolkit's [-1, 1] data; use centered=true"
            )
        if process == "subvp" and not continuous:
            raise ValueError("score_sde has no discrete sub-VP process; use continuous=true")
        self.net, self.sde, self.process = net, sde, process
        self.continuous, self.n_levels = bool(continuous), int(n_levels)
        self.data_scale = 1.0 if centered else 2.0  # toolkit units per network unit
        self.scale_by_sigma = bool(scale_by_sigma)

    def _std(self, t: torch.Tensor) -> torch.Tensor:
        """std(t) of the VP / sub-VP perturbation, as the network was trained with it."""
        if self.continuous:
            decay = 1 - torch.exp(2 * self.sde.log_alpha(t))
            return decay if self.process == "subvp" else torch.sqrt(decay)
        n = self.n_levels
        betas = torch.linspace(
            self.sde.beta_min / n, self.sde.beta_max / n, n, dtype=t.dtype, device=t.device
        )
        std = torch.sqrt(1 - torch.cumprod(1 - betas, 0))
        return std[(t * (n - 1)).long()]

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = () if y is None else (y,)
        if self.process != "ve":
            out = self.net(x, t * (self.n_levels - 1), *extra)
            return -out / append_dims(self._std(t).to(x.dtype), x.ndim)
        s_min, s_max = self.sde.sigma_min, self.sde.sigma_max
        if self.continuous:
            level = s_min / self.data_scale * (s_max / s_min) ** t
            label = level
        else:
            n = self.n_levels
            label = torch.round((1 - t) * (n - 1))
            logs = torch.linspace(math.log(s_max), math.log(s_min), n, dtype=t.dtype)
            level = torch.exp(logs.to(t.device))[label.long()] / self.data_scale
        out = self.net(x, label, *extra)
        if self.scale_by_sigma:
            out = out / append_dims(level.to(x.dtype), x.ndim)
        return out / self.data_scale


class EDMPrecondModel(_ScoreWrapper):
    """EDM's preconditioning (Karras et al. 2022, table 1) for any linear SDE.

    With x_t = alpha x_0 + sigma z, EDM's coordinates are x~ = x_t / alpha at noise level
    s = sigma / alpha, and its denoiser D(x~; s) = c_skip x~ + c_out F(c_in x~, c_noise) with
    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = ln(s) / 4 (sd = sigma_data). D estimates E[x_0 | x_t], so by Tweedie
        score(x_t, t) = (alpha D - x_t) / sigma^2.
    The network sees c_noise itself (`label="c_noise"`, a positional embedding) or exp(c_noise)
    (`label="exp"`, for an embedding that takes the log of its input, as NCSN++'s Fourier one).
    """

    def __init__(
        self, net: nn.Module, sde: SDE, sigma_data: float = 0.5, label: str = "c_noise"
    ) -> None:
        super().__init__()
        if label not in ("c_noise", "exp"):
            raise ValueError(f"label={label!r}; allowed: c_noise, exp")
        self.net, self.sde, self.sigma_data, self.label = net, sde, float(sigma_data), label

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        alpha, sigma = self.sde.alpha_sigma(t)
        s, sd2 = sigma / alpha, self.sigma_data**2
        k = s.square() + sd2
        c_noise = s.log() / 4
        label = c_noise if self.label == "c_noise" else c_noise.exp()
        extra = () if y is None else (y,)
        c_in = k.rsqrt() / alpha  # on x_t: x~ = x_t / alpha
        out = self.net(append_dims(c_in.to(x.dtype), x.ndim) * x, label, *extra)
        # (alpha D - x) / sigma^2 with D = c_skip x~ + c_out F, written without the cancellation
        # of alpha D against x_t at small sigma
        w_out = self.sigma_data / (sigma * k.sqrt())
        w_x = 1 / (alpha.square() * k)
        return (
            append_dims(w_out.to(x.dtype), x.ndim) * out - append_dims(w_x.to(x.dtype), x.ndim) * x
        )


class EDMVPModel(_ScoreWrapper):
    """EDM's VPPrecond (Karras et al. 2022, table 1) as the score of the VP SDE.

    EDM's network sees c_in x~ = x_t (x~ = x_t / alpha, c_in = alpha) and the label
    c_noise = (M - 1) t(sigma), where sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) and
    t(sigma) its inverse; D = x~ - sigma F, so
        score(x_t, t) = (alpha D - x_t) / std^2 = -F(x_t, c_noise) sqrt(1 + sigma^2) / sigma.
    c_noise is computed as EDM computes it, in float32 from sigma: at t = 1e-5 that round trip
    gives 0.00952 where 999 t = 0.00999, and the network was trained on those labels. The score
    is formed from F directly, not as EDM's (D - x) / sigma^2, whose float32 cancellation costs
    ~1e-4 of the score at t = 1e-5.
    """

    def __init__(self, net: nn.Module, sde: SDE, n_levels: int = 1000) -> None:
        super().__init__()
        self.net, self.sde, self.n_levels = net, sde, int(n_levels)
        self.beta_min = float(sde.beta_min)
        self.beta_d = float(sde.beta_max) - self.beta_min

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        t64 = t.double()
        sigma = torch.expm1(0.5 * self.beta_d * t64.square() + self.beta_min * t64).sqrt()
        s32 = sigma.float()
        t_of_sigma = (
            (self.beta_min**2 + 2 * self.beta_d * (1 + s32.square()).log()).sqrt() - self.beta_min
        ) / self.beta_d
        c_noise = (self.n_levels - 1) * t_of_sigma
        extra = () if y is None else (y,)
        out = self.net(x, c_noise.to(x.dtype), *extra)
        scale = (1 + sigma.square()).sqrt() / sigma
        return -out * append_dims(scale.to(x.dtype), x.ndim)
