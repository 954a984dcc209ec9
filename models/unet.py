"""A U-Net in the DDPM++ / NCSN++ spirit (Ho et al. 2020; Song et al. 2021, appendix H).

Residual blocks with GroupNorm and a time-embedding shift, self-attention at chosen resolutions,
skip connections across the bottleneck, skip scaling by 1/sqrt(2) and a zero-initialised output.
Works for square images from 8x8 up to 32x32 (and beyond) with a resolution divisible by
2^(len(ch_mult) - 1). Knows nothing of SDEs: net(x: (B, C, H, W), t: (B,)) -> (B, C, H, W);
with n_classes > 0, net(x, t, y) adds a class embedding (y = None or < 0: the null class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .embedding import class_index, make_embedding

_SKIP_SCALE = 1 / math.sqrt(2)


def _norm(ch: int) -> nn.GroupNorm:
    groups = min(32, max(1, ch // 4))
    while ch % groups:
        groups -= 1
    return nn.GroupNorm(groups, ch, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = _norm(cout), _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) * _SKIP_SCALE


class Attention(nn.Module):
    def __init__(self, ch: int, heads: int = 1) -> None:
        super().__init__()
        self.norm, self.heads = _norm(ch), heads
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * _SKIP_SCALE


class UNet(nn.Module):
    def __init__(
        self,
        shape: tuple[int, int, int],
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (4,),
        dropout: float = 0.0,
        embedding: str = "sinusoidal",
        n_classes: int = 0,
    ) -> None:
        super().__init__()
        c_img, res, res_w = shape
        self.n_classes = int(n_classes)
        if res != res_w or res % 2 ** (len(ch_mult) - 1):
            raise ValueError(
                f"UNet needs square images with side divisible by 2^(len(ch_mult)-1); got {shape}"
            )
        emb_dim = 4 * ch
        self.embed = nn.Sequential(
            make_embedding(embedding, ch),
            nn.Linear(ch, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
            nn.SiLU(),
        )
        if self.n_classes:  # class embedding (+ the null class), added to the time embedding
            self.label_embed = nn.Embedding(self.n_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(c_img, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, cur = [ch], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(cur, ch * mult, emb_dim, dropout))
                cur = ch * mult
                if res in attn_resolutions:
                    self.down.append(Attention(cur))
                skips.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                res //= 2
                skips.append(cur)
        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, emb_dim, dropout),
                Attention(cur),
                ResBlock(cur, cur, emb_dim, dropout),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), ch * mult, emb_dim, dropout))
                cur = ch * mult
                if res in attn_resolutions:
                    self.up.append(Attention(cur))
            if level != 0:
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(cur, cur, 3, padding=1))
                )
                res *= 2
        self.out = nn.Sequential(_norm(cur), nn.SiLU(), _zero(nn.Conv2d(cur, c_img, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        emb = self.embed(t)
        if self.n_classes:
            emb = emb + self.label_embed(class_index(y, self.n_classes, x.shape[0], x.device))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
                hs.append(h)
            elif isinstance(layer, Attention):
                h = layer(h)
                hs[-1] = h
            else:  # downsampling conv
                h = layer(h)
                hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.out(h)
