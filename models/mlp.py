"""A residual MLP for low-dimensional data, conditioned on time by an embedding."""

from __future__ import annotations

import math

import torch
from torch import nn

from .embedding import make_embedding


class MLP(nn.Module):
    """net(x: (B, *D), t: (B,)) -> (B, *D). Knows nothing of SDEs."""

    def __init__(
        self,
        shape: tuple[int, ...],
        hidden: int = 256,
        depth: int = 4,
        emb_dim: int = 64,
        embedding: str = "sinusoidal",
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        d = math.prod(self.shape)
        self.embed = nn.Sequential(
            make_embedding(embedding, emb_dim), nn.Linear(emb_dim, hidden), nn.SiLU()
        )
        self.inp = nn.Linear(d, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)
        )
        self.temb = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, d))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(t)
        h = self.inp(x.flatten(1))
        for block, temb in zip(self.blocks, self.temb):
            h = h + block(h + temb(emb))
        return self.out(h).reshape(x.shape)
