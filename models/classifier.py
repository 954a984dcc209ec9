"""Noise-conditional classifiers p_t(y | x) for classifier guidance (Song et al. 2021, App. I.4).

`NoisyClassifier(net, sde)` feeds the network the input scaled to unit variance, as `ScoreModel`
does (c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma^2)), and returns logits (B, K); it is trained
with cross-entropy on perturbed data x_t = alpha x_0 + sigma z (`training.conditional`).
Two small networks: an MLP with a time embedding for points, and a U-Net-style encoder (residual
blocks with the time-embedding shift, downsampling, global average pooling) for images.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from sde_lib import SDE, append_dims

from .embedding import make_embedding
from .unet import ResBlock, _norm


class PointClassifierNet(nn.Module):
    """(B, *D), (B,) -> logits (B, K): a residual MLP with the time embedding added per block."""

    def __init__(
        self,
        shape,
        n_classes: int,
        hidden: int = 128,
        depth: int = 3,
        emb_dim: int = 64,
        embedding: str = "sinusoidal",
    ) -> None:
        super().__init__()
        d = math.prod(shape)
        self.embed = nn.Sequential(
            make_embedding(embedding, emb_dim), nn.Linear(emb_dim, hidden), nn.SiLU()
        )
        self.inp = nn.Linear(d, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)
        )
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(t)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block(h + emb)
        return self.head(h)


class ImageClassifierNet(nn.Module):
    """(B, C, H, W), (B,) -> logits (B, K): residual blocks at each resolution (halved between
    levels), global average pooling and a linear head."""

    def __init__(
        self, shape, n_classes: int, ch: int = 32, levels: int = 2, embedding: str = "sinusoidal"
    ) -> None:
        super().__init__()
        emb_dim = 4 * ch
        self.embed = nn.Sequential(make_embedding(embedding, ch), nn.Linear(ch, emb_dim), nn.SiLU())
        self.conv_in = nn.Conv2d(shape[0], ch, 3, padding=1)
        self.blocks = nn.ModuleList()
        cur = ch
        for level in range(levels):
            self.blocks.append(ResBlock(cur, ch * 2**level, emb_dim, 0.0))
            cur = ch * 2**level
        self.out = nn.Sequential(_norm(cur), nn.SiLU())
        self.head = nn.Linear(cur, n_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(t)
        h = self.conv_in(x)
        for i, block in enumerate(self.blocks):
            if i and min(h.shape[-2:]) >= 2:
                h = F.avg_pool2d(h, 2)
            h = block(h, emb)
        return self.head(self.out(h).mean((-2, -1)))


class NoisyClassifier(nn.Module):
    """log p_t(y | x) up to a constant: forward(x, t) -> logits (B, K), for any SDE."""

    def __init__(self, net: nn.Module, sde: SDE, n_classes: int, sigma_data: float = 1.0):
        super().__init__()
        self.net, self.sde = net, sde
        self.n_classes, self.sigma_data = int(n_classes), float(sigma_data)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.sde.alpha_sigma(t)
        c_in = (alpha.square() * self.sigma_data**2 + sigma.square()).rsqrt()
        return self.net(append_dims(c_in.to(x.dtype), x.ndim) * x, t)
