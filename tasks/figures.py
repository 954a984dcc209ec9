"""Pictures of samples: a scatter plot over the data law's density (2-D) or an image grid."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from sde_lib.io import atomic_write


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def scatter_2d(
    samples: torch.Tensor, path: Path, *, mixture=None, reference=None, title: str = ""
) -> None:
    """Samples over the exact density contours (mixture) or over fresh data (reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = samples.detach().cpu().double().numpy()
    fig, ax = plt.subplots(figsize=(5, 5))
    lim = float(np.quantile(np.abs(x), 0.995)) * 1.15 + 0.5
    if mixture is not None:
        grid = torch.linspace(-lim, lim, 200, dtype=torch.float64)
        xx, yy = torch.meshgrid(grid, grid, indexing="xy")
        logp = mixture.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(200, 200)
        ax.contour(
            xx.numpy(), yy.numpy(), logp.exp().numpy(), levels=8, cmap="Greys", linewidths=0.8
        )
    elif reference is not None:
        r = reference.detach().cpu().numpy()
        ax.scatter(r[:, 0], r[:, 1], s=2, c="0.75", label="data")
    ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:blue", label="samples")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title)
    fig.tight_layout()
    _save_fig(fig, path)


def image_grid(images: np.ndarray, path: Path, max_images: int = 64, min_px: int = 64) -> None:
    """Images (N, C, H, W) of uint8 as one PNG grid with a 1-pixel border, upscaled (nearest)
    by a whole factor so each image is at least `min_px` pixels (8x8 digits: 8x, 28x28: 3x)."""
    from PIL import Image

    imgs = images[:max_images]
    n, c, h, w = imgs.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    canvas = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, q = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = (
            im.transpose(1, 2, 0)
        )
    pil = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    scale = max(1, math.ceil(min_px / max(h, w)), 256 // max(canvas.shape[:2]))
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    atomic_write(path, lambda f: f.write(buf.getvalue()))
