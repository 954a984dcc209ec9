"""FIR up- and down-sampling of images (Zhang 2019; Karras et al. 2020, StyleGAN2), plain PyTorch.

NCSN++ resamples with a separable low-pass filter k (default [1, 3, 3, 1]) instead of nearest
neighbours or average pooling. Everything reduces to one primitive, `upfirdn2d`: insert up - 1
zeros after every pixel, zero-pad, convolve every channel with k, keep every down-th pixel. The
filter is normalised to sum 1, times up^2 when upsampling so that a constant image stays constant.
The fused variants (`conv_downsample_2d`, `upsample_conv_2d`) filter once around a strided 3x3
convolution, with the padding StyleGAN2 specifies so that the output is aligned with the input.
No compiled extension: depthwise `conv2d` runs on every device and supports double backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def fir_kernel(k: Sequence[float], gain: float = 1.0) -> torch.Tensor:
    """The 2-D filter of a 1-D tap list: outer(k, k) / sum, times gain; (K, K) float32."""
    k1 = torch.as_tensor(list(k), dtype=torch.float32)
    k2 = torch.outer(k1, k1) if k1.ndim == 1 else k1
    return k2 / k2.sum() * gain


def upfirdn2d(
    x: torch.Tensor, k: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Upsample by zero insertion, pad by pad = (before, after) on both axes, convolve each channel
    with k (a true convolution: k is flipped), then keep every `down`-th pixel. x: (B, C, H, W)."""
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(k, (0, 1)).to(x)[None, None].expand(c, 1, *k.shape)
    x = F.conv2d(x, weight, groups=c)
    return x[:, :, ::down, ::down] if down > 1 else x


def upsample_2d(x: torch.Tensor, k: Sequence[float], factor: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 2H, 2W) through the filter k."""
    kernel = fir_kernel(k, factor**2)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, k: Sequence[float], factor: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H/2, W/2) through the filter k."""
    kernel = fir_kernel(k)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def conv_downsample_2d(
    x: torch.Tensor, weight: torch.Tensor, k: Sequence[float], factor: int = 2
) -> torch.Tensor:
    """Filter with k, then a stride-`factor` convolution with `weight` (out, in, K, K)."""
    kernel = fir_kernel(k)
    p = (kernel.shape[0] - factor) + (weight.shape[-1] - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=factor)


def upsample_conv_2d(
    x: torch.Tensor, weight: torch.Tensor, k: Sequence[float], factor: int = 2
) -> torch.Tensor:
    """`upsample_2d` followed by a convolution with `weight` (out, in, K, K), fused: a
    stride-`factor` transposed convolution, then the filter k (StyleGAN2's fused upsample-conv).

    The transposed convolution takes the kernel flipped and with its in/out axes swapped, which
    makes it the convolution with `weight` of the zero-upsampled input; the output equals
    upsample-then-convolve away from the border, where the single padding differs."""
    kernel = fir_kernel(k, factor**2)
    size = weight.shape[-1]
    p = (kernel.shape[0] - factor) - (size - 1)
    w_t = torch.flip(weight, (2, 3)).transpose(0, 1)
    x = F.conv_transpose2d(x, w_t, stride=factor)
    return upfirdn2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling: every pixel repeated factor x factor times."""
    return F.interpolate(x, scale_factor=factor, mode="nearest")


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average pooling over factor x factor blocks."""
    return F.avg_pool2d(x, factor)
