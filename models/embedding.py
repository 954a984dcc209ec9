"""Noise-level embeddings: sinusoidal (DDPM, Vaswani et al.) and Gaussian Fourier (NCSN++)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class SinusoidalEmbedding(nn.Module):
    """emb(t) = [sin(s t w_i), cos(s t w_i)], w_i = 10000^(-i / (dim/2)), scale s = 1000."""

    def __init__(self, dim: int, scale: float = 1000.0) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = self.scale * t.float()[:, None] * self.freqs[None]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of t (Tancik et al. 2020), fixed after initialisation.

    The frequencies are a frozen parameter (not a buffer): they count among the network's
    parameters, as in NCSN++, and are left alone by the optimiser."""

    def __init__(self, dim: int, std: float = 16.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim // 2) * std, requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # in this order, as NCSN++ computes it: the argument reaches ~1e3, where float32 rounding
        # of another order changes sin / cos by ~1e-4
        arg = t.float()[:, None] * self.w[None] * 2 * math.pi
        return torch.cat([arg.sin(), arg.cos()], dim=1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DDPM's sinusoidal embedding of a (possibly fractional) time step t: (B,) -> (B, dim),
    [sin(t w_i), cos(t w_i)] with w_i = max_period^(-i / (dim/2 - 1)), zero-padded to odd dim."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=t.device)
        * (-math.log(max_period) / (half - 1))
    )
    arg = t.float()[:, None] * freqs[None]
    emb = torch.cat([arg.sin(), arg.cos()], dim=1)
    return F.pad(emb, (0, dim % 2))


def make_embedding(kind: str, dim: int) -> nn.Module:
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if kind == "fourier":
        return FourierEmbedding(dim)
    raise ValueError(f"unknown time embedding {kind!r}; allowed: sinusoidal, fourier")


def class_index(y: torch.Tensor | None, n_classes: int, batch: int, device) -> torch.Tensor:
    """Rows of a class-embedding table with n_classes + 1 rows: y, or the null class n_classes
    for y = None (the whole batch) and for labels y < 0."""
    if y is None:
        return torch.full((batch,), n_classes, dtype=torch.long, device=device)
    y = y.to(device=device, dtype=torch.long)
    return torch.where(y < 0, torch.full_like(y, n_classes), y)
