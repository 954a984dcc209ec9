"""A residual MLP for low-dimensional data, conditioned on time by an embedding."""

from __future__ import annotations

import math

import torch
from torch import nn

from .embedding import class_index, make_embedding


class MLP(nn.Module):
    """net(x: (B, *D), t: (B,)[, y: (B,)]) -> (B, *D). Knows nothing of SDEs.

    With n_classes > 0 it is class-conditional: a learned class embedding (n_classes + 1 rows,
    the last the null class, taken for y = None or y < 0) is added to the time embedding.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        hidden: int = 256,
        depth: int = 4,
        emb_dim: int = 64,
        embedding: str = "sinusoidal",
        n_classes: int = 0,
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.n_classes = int(n_classes)
        if self.n_classes:
            self.label_embed = nn.Embedding(self.n_classes + 1, hidden)
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

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        emb = self.embed(t)
        if self.n_classes:
            emb = emb + self.label_embed(class_index(y, self.n_classes, x.shape[0], x.device))
        h = self.inp(x.flatten(1))
        for block, temb in zip(self.blocks, self.temb):
            h = h + block(h + temb(emb))
        return self.out(h).reshape(x.shape)
