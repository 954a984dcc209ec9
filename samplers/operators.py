"""Linear measurement operators y = A x for inverse problems, each with its singular value
decomposition A = U diag(s) Vᵀ (what DDRM works in, and what makes ΠGDM's and the twisted
sampler's Gaussian likelihood cheap).

Up to MAX_VALUES values per example an operator is stored as a dense float64 matrix over the
flattened example and decomposed once with LAPACK, so that one code path serves all of them
exactly: inpainting masks, Gaussian blur, block-average downsampling, colour-to-grey, the identity
(denoising) and any matrix a user gives (n² values: 784² for MNIST, 3072² for CIFAR-10). Larger
images get the same operators without a matrix (`MatrixFreeOperator`: convolution, pooling,
indexing), which is all DPS needs; the methods that work in A's SVD refuse them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

MAX_VALUES = 4096  # the largest example a dense operator is built for (a 64 x 64 x 1 image)
OPERATORS = ("mask", "blur", "downsample", "colorize", "identity", "matrix")


@dataclass
class LinearOperator:
    """A: (m, n) with its SVD; n = prod(shape), `shape` the shape of one example.

    u: (m, m), s: (m,) singular values sorted decreasingly (zeros where A has no rank),
    v: (n, n), whose first m columns pair with s (the others span the null space).
    """

    name: str
    matrix: torch.Tensor
    shape: tuple[int, ...]
    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor

    @classmethod
    def from_matrix(cls, name: str, matrix: torch.Tensor, shape: tuple[int, ...]) -> LinearOperator:
        a = matrix.double()
        m, n = a.shape
        if n != math.prod(shape):
            raise ValueError(f"{name}: A has {n} columns but an example holds {math.prod(shape)}")
        if m > n:
            raise ValueError(f"{name}: A has more rows ({m}) than columns ({n})")
        u, s, vh = torch.linalg.svd(a, full_matrices=True)
        # singular values below the float64 rank tolerance are exactly zero: no information
        s = torch.where(s > s.max() * max(m, n) * torch.finfo(torch.float64).eps, s, 0.0)
        return cls(name, a, tuple(shape), u, s, vh.T.contiguous())

    has_svd = True

    @property
    def m(self) -> int:
        return self.matrix.shape[0]

    @property
    def n(self) -> int:
        return self.matrix.shape[1]

    def to(self, device: torch.device | str) -> LinearOperator:
        moved = {k: getattr(self, k).to(device) for k in ("matrix", "u", "s", "v")}
        return LinearOperator(self.name, shape=self.shape, **moved)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A x: (B, *shape) -> (B, m), in x's dtype."""
        return x.flatten(1) @ self.matrix.T.to(x.dtype)

    def spectral(self, x: torch.Tensor) -> torch.Tensor:
        """Vᵀ x: (B, *shape) -> (B, n) float64."""
        return x.flatten(1).double() @ self.v

    def from_spectral(self, c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """V c: (B, n) -> (B, *shape) in like's dtype."""
        return (c @ self.v.T).to(like.dtype).reshape(like.shape)

    def y_spectral(self, y: torch.Tensor) -> torch.Tensor:
        """Uᵀ y: (B, m) -> (B, m) float64: the measurement in the singular basis."""
        return y.double() @ self.u

    def pinv(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The least-norm x with A x = y: A⁺ y, (B, m) -> (B, *shape)."""
        c = torch.zeros(y.shape[0], self.n, dtype=torch.float64, device=y.device)
        pos = self.s > 0
        c[:, : self.m][:, pos] = self.y_spectral(y)[:, pos] / self.s[pos]
        return self.from_spectral(c, like)


@dataclass
class MatrixFreeOperator:
    """A as a function of images (B, C, H, W) -> (B, m), with no matrix and no SVD. `pinv` is
    exact for the operators whose A Aᵀ is a multiple of I (mask, downsample, colorize, identity)
    and gives the blurred image itself for blur (what a picture of the measurement shows)."""

    name: str
    shape: tuple[int, ...]
    m: int
    forward: Callable[[torch.Tensor], torch.Tensor]
    has_svd = False

    @property
    def n(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> MatrixFreeOperator:
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x.reshape(x.shape[0], *self.shape)).flatten(1)

    def pinv(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.m == self.n:  # blur, identity
            return y.to(like.dtype).reshape(like.shape)
        zero = torch.zeros_like(like).requires_grad_(True)
        with torch.enable_grad():  # Aᵀ y, by autograd through A
            (at_y,) = torch.autograd.grad((self(zero) * y.to(like.dtype)).sum(), zero)
        # A Aᵀ = I for a mask, I / 3 for colorize, I / factor² for downsample
        return (1.0 if self.name == "mask" else self.n / self.m) * at_y


def _matrix_free(name: str, shape: tuple[int, ...], known, blur_std: float, factor: int):
    c, h, w = shape
    if name == "identity":
        return MatrixFreeOperator(name, shape, c * h * w, lambda x: x)
    if name == "mask":
        idx = known.reshape(-1).nonzero().squeeze(1)
        return MatrixFreeOperator(
            name, shape, idx.numel(), lambda x: x.flatten(1)[:, idx.to(x.device)]
        )
    if name == "colorize":
        return MatrixFreeOperator(name, shape, h * w, lambda x: x.mean(1))
    if name == "downsample":
        return MatrixFreeOperator(
            name, shape, c * (h // factor) * (w // factor),
            lambda x: torch.nn.functional.avg_pool2d(x, factor),
        )  # fmt: skip
    r = max(1, math.ceil(3 * blur_std))
    taps = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / blur_std) ** 2)
    taps = taps / taps.sum()

    def blur(x: torch.Tensor) -> torch.Tensor:
        k = taps.to(x)
        x = torch.nn.functional.conv2d(
            x, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c
        )
        return torch.nn.functional.conv2d(
            x, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c
        )

    return MatrixFreeOperator(name, shape, c * h * w, blur)


def gaussian_blur_1d(size: int, std: float) -> torch.Tensor:
    """The (size, size) matrix of a 1-D Gaussian blur with zero padding: each output is the
    weighted sum of its neighbours within 3 std, the weights normalised to 1 over the kernel."""
    r = max(1, math.ceil(3 * std))
    taps = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / std) ** 2)
    taps = taps / taps.sum()
    i = torch.arange(size)
    off = i[None, :] - i[:, None]  # column - row
    return torch.where(off.abs() <= r, taps[(off + r).clamp(0, 2 * r)], 0.0)


def block_average_1d(size: int, factor: int) -> torch.Tensor:
    """(size / factor, size): the mean of each run of `factor` values."""
    return (
        torch.kron(torch.eye(size // factor, dtype=torch.float64), torch.ones(1, factor)) / factor
    )


def build_operator(
    name: str,
    shape: tuple[int, ...],
    *,
    known: torch.Tensor | None = None,
    blur_std: float = 1.0,
    factor: int = 2,
    matrix: torch.Tensor | None = None,
) -> LinearOperator:
    """The operator `name` (one of OPERATORS) for examples of `shape` ((C, H, W) for images).

    mask: known, a bool tensor of `shape`, True where a value is observed (A selects those);
    blur: a separable Gaussian blur of std `blur_std` pixels, per channel, zero padding;
    downsample: the mean of `factor` x `factor` blocks, per channel (H, W divisible by factor);
    colorize: the mean of the 3 channels of each pixel; identity: A = I (denoising);
    matrix: `matrix`, (m, n). Raises ValueError naming what does not fit.
    """
    n = math.prod(shape)
    image = len(shape) == 3
    if name in ("blur", "downsample", "colorize") and not image:
        raise ValueError(f"operator={name} needs image data (C, H, W); got examples of {shape}")
    _check_parameters(name, shape, known, blur_std, factor, matrix)
    if n > MAX_VALUES:
        if name == "matrix":
            raise ValueError(
                f"operator=matrix: an ({n} x {n}) matrix for examples of {n} values is too large "
                f"(at most {MAX_VALUES} values; use a named operator)"
            )
        return _matrix_free(name, tuple(shape), known, blur_std, factor)
    eye = torch.eye(n, dtype=torch.float64)
    if name == "identity":
        a = eye
    elif name == "mask":
        a = eye[known.reshape(-1).cpu()]
    elif name == "blur":
        c, h, w = shape
        per_channel = torch.kron(gaussian_blur_1d(h, blur_std), gaussian_blur_1d(w, blur_std))
        a = torch.kron(torch.eye(c, dtype=torch.float64), per_channel)
    elif name == "downsample":
        c, h, w = shape
        per_channel = torch.kron(block_average_1d(h, factor), block_average_1d(w, factor))
        a = torch.kron(torch.eye(c, dtype=torch.float64), per_channel)
    elif name == "colorize":
        c, h, w = shape
        a = torch.cat([torch.eye(h * w, dtype=torch.float64)] * 3, dim=1) / 3
    else:
        a = matrix.double()
    return LinearOperator.from_matrix(name, a, shape)


def _check_parameters(name, shape, known, blur_std, factor, matrix) -> None:
    n = math.prod(shape)
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}; allowed: {', '.join(OPERATORS)}")
    if name == "mask":
        if known is None or tuple(known.shape) != tuple(shape) or known.dtype != torch.bool:
            raise ValueError(f"operator=mask needs a bool mask of shape {tuple(shape)}")
    elif name == "blur" and not blur_std > 0:
        raise ValueError(f"blur_std must be > 0, got {blur_std}")
    elif name == "downsample":
        _, h, w = shape
        if not isinstance(factor, int) or factor < 2 or h % factor or w % factor:
            raise ValueError(
                f"operator=downsample needs an integer factor >= 2 dividing the image size "
                f"{h} x {w}; got factor={factor}"
            )
    elif name == "colorize" and shape[0] != 3:
        raise ValueError(f"operator=colorize needs 3-channel images; got {shape[0]} channel(s)")
    elif name == "matrix":
        if matrix is None or matrix.ndim != 2 or matrix.shape[1] != n:
            got = None if matrix is None else tuple(matrix.shape)
            raise ValueError(f"operator=matrix needs an (m, {n}) matrix; got {got}")
        if not bool(torch.isfinite(matrix).all()) or not bool((matrix != 0).any()):
            raise ValueError("operator=matrix needs finite values, not all zero")
