"""NCSN++ and DDPM++ (Song et al. 2021, appendix H), and score_sde's DDPM network, as one U-Net.

The paper's two architectures are settings of one network:
- DDPM++: `resblock_type="biggan"`, no FIR, positional (sinusoidal) noise embedding, no progressive
  growing; NCSN++: BigGAN blocks with FIR resampling (`fir_kernel` [1, 3, 3, 1]), a Gaussian
  Fourier embedding of log sigma and a progressive input pyramid (`progressive_input="residual"`).
- `resblock_type="ddpm"` with `norm_groups=32`, no FIR and `skip_rescale=False` is the DDPM network
  of score_sde (Ho et al.'s, but with one attention block per up-sampling level).

Progressive growing (StyleGAN2) adds an image pyramid: `progressive_input` feeds a downsampled copy
of the input into every level (`input_skip`: combined by a 1x1 convolution, `sum` or `cat`;
`residual`: a strided convolution added to the features), `progressive` sums per-level RGB outputs
(`output_skip`) or adds upsampled features (`residual`) on the way up.

Knows nothing of SDEs: net(x: (B, C, H, W), label: (B,)) -> (B, C, H, W), where `label` is the
noise-level input (a time step for the positional embedding, sigma for the Fourier one, which
embeds its log) and
the score wrapper (`models.score.ScoreModel`) decides what it is and how the output becomes a
score. With n_classes > 0, net(x, label, y) adds a class embedding (y None or < 0: the null class).

Modules are registered in the order in which score_sde's implementation creates them, so that
`models.pretrained` can map its flat checkpoints onto this network one tensor after the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import resample
from .embedding import FourierEmbedding, class_index, timestep_embedding

RESBLOCKS = ("biggan", "ddpm")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
COMBINE = ("sum", "cat")
EMBEDDINGS = ("fourier", "positional")


def ddpm_init_(weight: torch.Tensor, scale: float = 1.0, fans: tuple[int, int] | None = None):
    """DDPM's initialisation: uniform with variance scale / mean(fan_in, fan_out); scale 0 means
    1e-10, so a layer starts (almost) silent but still receives gradients."""
    scale = 1e-10 if scale == 0 else scale
    if fans is None:
        receptive = weight[0, 0].numel() if weight.ndim > 2 else 1
        fans = (weight.shape[1] * receptive, weight.shape[0] * receptive)
    bound = math.sqrt(3 * scale / ((fans[0] + fans[1]) / 2))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv(cin: int, cout: int, size: int = 3, init_scale: float = 1.0, **kw) -> nn.Conv2d:
    layer = nn.Conv2d(cin, cout, size, padding=kw.pop("padding", size // 2), **kw)
    ddpm_init_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def dense(cin: int, cout: int) -> nn.Linear:
    layer = nn.Linear(cin, cout)
    ddpm_init_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(ch: int, groups: int | None) -> nn.GroupNorm:
    """NCSN++: min(ch / 4, 32) groups; DDPM: a fixed number (32)."""
    return nn.GroupNorm(groups or min(ch // 4, 32), ch, eps=1e-6)


class FIRConv(nn.Module):
    """A convolution fused with FIR up- or down-sampling (StyleGAN2): weight (out, in, K, K)."""

    def __init__(self, cin: int, cout: int, size: int, up: bool, kernel: Sequence[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(ddpm_init_(torch.empty(cout, cin, size, size)))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.up, self.kernel = up, tuple(kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = resample.upsample_conv_2d(x, self.weight, self.kernel)
        else:
            x = resample.conv_downsample_2d(x, self.weight, self.kernel)
        return x + self.bias[:, None, None]


class Resample(nn.Module):
    """Up- or down-sampling by 2: FIR or nearest / average, optionally fused with a convolution."""

    def __init__(
        self,
        cin: int,
        cout: int | None,
        up: bool,
        with_conv: bool,
        fir: bool,
        kernel: Sequence[int],
        size: int = 3,
    ) -> None:
        super().__init__()
        cout = cout or cin
        self.up, self.fir, self.kernel = up, fir, tuple(kernel)
        self.conv: nn.Module | None = None
        if with_conv and fir:
            self.conv = FIRConv(cin, cout, size, up, kernel)
        elif with_conv and up:
            self.conv = conv(cin, cout, size)
        elif with_conv:  # stride 2 on the input padded by one row and column at the far end
            self.conv = conv(cin, cout, size, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            if self.conv is not None:
                return self.conv(x)
            return (resample.upsample_2d if self.up else resample.downsample_2d)(x, self.kernel)
        if self.up:
            x = resample.naive_upsample_2d(x)
            return x if self.conv is None else self.conv(x)
        if self.conv is None:
            return resample.naive_downsample_2d(x)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ResBlock(nn.Module):
    """Residual block with a noise-embedding shift (DDPM), optionally resampling inside (BigGAN).

    h = conv1(drop(act(norm1(conv0(resample(act(norm0(x)))) + dense(act(emb)))))),
    out = (skip(resample(x)) + h) * (1/sqrt 2 if skip_rescale); skip is a 1x1 convolution when the
    shape changes."""

    def __init__(
        self,
        cin: int,
        cout: int | None,
        emb_dim: int,
        dropout: float,
        skip_rescale: bool,
        init_scale: float,
        groups: int | None,
        size: int = 3,
        resample_mode: str | None = None,
        fir: bool = False,
        kernel: Sequence[int] = (1, 3, 3, 1),
        biggan: bool = True,
    ) -> None:
        super().__init__()
        cout = cout or cin
        self.norm0 = group_norm(cin, groups)
        self.conv0 = conv(cin, cout, size)
        self.dense = dense(emb_dim, cout)
        self.norm1 = group_norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv(cout, cout, size, init_scale)
        self.skip: nn.Module | None = None
        if cin != cout or resample_mode is not None:
            self.skip = conv(cin, cout, 1, 1.0 if biggan else 0.1)
        self.resample_mode, self.fir, self.kernel = resample_mode, fir, tuple(kernel)
        self.scale = 1 / math.sqrt(2) if skip_rescale else 1.0

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample_mode == "up":
            return (
                resample.upsample_2d(x, self.kernel) if self.fir else resample.naive_upsample_2d(x)
            )
        if self.resample_mode == "down":
            if self.fir:
                return resample.downsample_2d(x, self.kernel)
            return resample.naive_downsample_2d(x)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm0(x))
        h, x = self._resample(h), self._resample(x)
        h = self.conv0(h) + self.dense(F.silu(emb))[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * self.scale


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, ch: int, skip_rescale: bool, init_scale: float, groups: int | None) -> None:
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.q, self.k, self.v = (conv(ch, ch, 1, 0.1) for _ in range(3))
        self.proj = conv(ch, ch, 1, init_scale)
        self.scale = 1 / math.sqrt(2) if skip_rescale else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (
            f(h).reshape(b, 1, c, hh * ww).transpose(-1, -2) for f in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        out = out.transpose(-1, -2).reshape(b, c, hh, ww)
        return (x + self.proj(out)) * self.scale


class Combine(nn.Module):
    """Merge the input pyramid into the features: a 1x1 convolution, then sum or concatenation."""

    def __init__(self, cin: int, cout: int, method: str) -> None:
        super().__init__()
        self.conv, self.method = conv(cin, cout, 1), method

    def forward(self, pyramid: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        p = self.conv(pyramid)
        return torch.cat([p, h], dim=1) if self.method == "cat" else p + h


class Stage(nn.Module):
    """One residual block of the down path and its attention block (if at this resolution)."""

    def __init__(self, block: ResBlock, attn: Attention | None) -> None:
        super().__init__()
        self.block, self.attn = block, attn

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block(h, emb)
        return h if self.attn is None else self.attn(h)


class NCSNpp(nn.Module):
    """The NCSN++ / DDPM++ U-Net; the keyword names are those of score_sde's configurations."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        fir: bool = False,
        fir_kernel: Sequence[int] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        resblock_type: str = "biggan",
        progressive: str = "none",
        progressive_input: str = "none",
        progressive_combine: str = "sum",
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        init_scale: float = 0.0,
        conv_size: int = 3,
        norm_groups: int | None = None,
        n_classes: int = 0,
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("resblock_type", resblock_type, RESBLOCKS),
            ("progressive", progressive, PROGRESSIVE),
            ("progressive_input", progressive_input, PROGRESSIVE_INPUT),
            ("progressive_combine", progressive_combine, COMBINE),
            ("embedding_type", embedding_type, EMBEDDINGS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not known; allowed: {', '.join(allowed)}")
        channels, res, res_w = shape
        levels = len(ch_mult)
        if res != res_w or res % 2 ** (levels - 1):
            raise ValueError(
                f"NCSN++ needs square images with side divisible by 2^(len(ch_mult)-1) = "
                f"{2 ** (levels - 1)}; got {tuple(shape)}"
            )
        if conv_size % 2 != 1:
            raise ValueError(f"conv_size={conv_size} must be odd")
        self.nf, self.n_classes = nf, int(n_classes)
        self.embedding_type, self.progressive = embedding_type, progressive
        self.progressive_input, self.biggan = progressive_input, resblock_type == "biggan"
        self.skip_scale = 1 / math.sqrt(2) if skip_rescale else 1.0
        kernel = tuple(fir_kernel)
        emb_dim = 4 * nf

        def block(cin, cout=None, mode=None):
            return ResBlock(
                cin, cout, emb_dim, dropout, skip_rescale, init_scale, norm_groups, conv_size,
                mode, fir, kernel, biggan=self.biggan,
            )  # fmt: skip

        def attention(ch):
            return Attention(ch, skip_rescale, init_scale, norm_groups)

        def resampler(cin, cout, up, with_conv):
            return Resample(cin, cout, up, with_conv, fir, kernel, conv_size)

        # noise-level embedding: Fourier features of log sigma (2 nf) or DDPM's sinusoids (nf)
        self.fourier = (
            FourierEmbedding(2 * nf, fourier_scale) if embedding_type == "fourier" else None
        )
        self.dense0 = dense(2 * nf if self.fourier is not None else nf, emb_dim)
        self.dense1 = dense(emb_dim, emb_dim)
        if self.n_classes:  # class embedding (+ the null class), added to the noise embedding
            self.label_embed = nn.Embedding(self.n_classes + 1, emb_dim)

        self.conv_in = conv(channels, nf, conv_size)
        skips, ch, pyramid_ch = [nf], nf, channels
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            part = nn.Module()
            stages = []
            for _ in range(num_res_blocks):
                b = block(ch, nf * mult)
                ch = nf * mult
                stages.append(Stage(b, attention(ch) if res in attn_resolutions else None))
                skips.append(ch)
            part.stages = nn.ModuleList(stages)
            part.resample, part.pyramid = None, None
            if level != levels - 1:
                part.resample = (
                    block(ch, mode="down")
                    if self.biggan
                    else resampler(ch, ch, False, resamp_with_conv)
                )
                if progressive_input == "input_skip":
                    part.pyramid = Combine(pyramid_ch, ch, progressive_combine)
                    ch = 2 * ch if progressive_combine == "cat" else ch
                elif progressive_input == "residual":
                    part.pyramid = resampler(pyramid_ch, ch, False, True)
                    pyramid_ch = ch
                res //= 2
                skips.append(ch)
            self.down.append(part)

        self.mid = nn.ModuleList([block(ch), attention(ch), block(ch)])

        self.up = nn.ModuleList()
        pyramid_ch = 0
        for level, mult in reversed(list(enumerate(ch_mult))):
            part = nn.Module()
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skips.pop(), nf * mult))
                ch = nf * mult
            part.blocks = nn.ModuleList(blocks)
            part.attn = attention(ch) if res in attn_resolutions else None
            part.pyramid_norm, part.pyramid_conv, part.pyramid_up = None, None, None
            if progressive == "output_skip":  # this level's image, summed over levels
                part.pyramid_norm = group_norm(ch, norm_groups)
                part.pyramid_conv = conv(ch, channels, conv_size, init_scale)
            elif progressive == "residual" and level == levels - 1:
                part.pyramid_norm = group_norm(ch, norm_groups)
                part.pyramid_conv = conv(ch, ch, conv_size)
                pyramid_ch = ch
            elif progressive == "residual":
                part.pyramid_up = resampler(pyramid_ch, ch, True, True)
                pyramid_ch = ch
            part.resample = None
            if level != 0:
                part.resample = (
                    block(ch, mode="up")
                    if self.biggan
                    else resampler(ch, ch, True, resamp_with_conv)
                )
                res *= 2
            self.up.append(part)

        self.out_norm, self.out_conv = None, None
        if progressive != "output_skip":
            self.out_norm = group_norm(ch, norm_groups)
            self.out_conv = conv(ch, channels, conv_size, init_scale)
        self.fir, self.kernel = fir, kernel

    def _pyramid_resample(self, x: torch.Tensor, up: bool) -> torch.Tensor:
        """The input / output pyramid's resampling without a convolution."""
        if self.fir:
            return (resample.upsample_2d if up else resample.downsample_2d)(x, self.kernel)
        return resample.naive_upsample_2d(x) if up else resample.naive_downsample_2d(x)

    def forward(
        self, x: torch.Tensor, label: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.fourier is not None:
            emb = self.fourier(torch.log(label))  # Fourier features of the log noise level
        else:
            emb = timestep_embedding(label, self.nf)
        emb = self.dense1(F.silu(self.dense0(emb.to(x.dtype))))
        if self.n_classes:
            emb = emb + self.label_embed(class_index(y, self.n_classes, x.shape[0], x.device))

        pyramid = x if self.progressive_input != "none" else None
        hs = [self.conv_in(x)]
        for part in self.down:
            for stage in part.stages:
                hs.append(stage(hs[-1], emb))
            if part.resample is None:
                continue
            h = part.resample(hs[-1], emb) if self.biggan else part.resample(hs[-1])
            if self.progressive_input == "input_skip":
                pyramid = self._pyramid_resample(pyramid, up=False)
                h = part.pyramid(pyramid, h)
            elif self.progressive_input == "residual":
                pyramid = h = (part.pyramid(pyramid) + h) * self.skip_scale
            hs.append(h)

        h = self.mid[0](hs[-1], emb)
        h = self.mid[2](self.mid[1](h), emb)

        pyramid = None
        for part in self.up:
            for b in part.blocks:
                h = b(torch.cat([h, hs.pop()], dim=1), emb)
            if part.attn is not None:
                h = part.attn(h)
            if part.pyramid_up is not None:  # progressive="residual", below the top level
                pyramid = h = (part.pyramid_up(pyramid) + h) * self.skip_scale
            elif part.pyramid_conv is not None:
                image = part.pyramid_conv(F.silu(part.pyramid_norm(h)))
                if pyramid is None or self.progressive == "residual":
                    pyramid = image
                else:
                    pyramid = self._pyramid_resample(pyramid, up=True) + image
            if part.resample is not None:
                h = part.resample(h, emb) if self.biggan else part.resample(h)

        if self.progressive == "output_skip":
            return pyramid
        return self.out_conv(F.silu(self.out_norm(h)))
