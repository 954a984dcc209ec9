"""A small CNN classifier trained by the toolkit on a labelled image set; its penultimate layer
gives the features for FID/KID/precision/recall on data sets (digits, MNIST) where Inception-v3,
trained on 299x299 photographs, is not a meaningful feature space.

Trained once per data content: the cache file is `<outputs_root>/features/classifier-<hash>.pt`,
where the hash covers the architecture version, the training settings and the training images and
labels. The file holds only tensors and plain numbers (saved atomically, loaded with
`torch.load(..., weights_only=True)`), so loading it cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sde_lib.io import atomic_write

log = logging.getLogger(__name__)

ARCH_VERSION = "cnn-v2"
# epochs None: 15 for images up to 16 px (digits: ~4 s on one CPU thread), else 8 (MNIST: ~30 s)
SETTINGS = {"epochs": None, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "seed": 0}


class SmallCNN(nn.Module):
    """conv32-conv32-pool-conv64-conv64-avgpool(2x2)-fc128-fc(classes) for (N, C, H, W) in [-1, 1].

    `features(x)` is the 128-D post-ReLU penultimate layer (N, 128) divided by `feature_scale`
    (set after training to the RMS of the training set's features, so that features are O(1)
    as Inception's are and KID's cubic kernel (x·y/d + 1)^3 stays in its usual regime);
    `forward(x)` gives the logits. Works for any H, W >= 2 (adaptive pooling).
    """

    def __init__(self, channels: int, n_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * w, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, n_classes)
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def to_input(images_uint8) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 in [-1, 1]."""
    return torch.as_tensor(np.asarray(images_uint8)).float().div(127.5).sub(1.0)


def resolved_settings(image_size: int, settings: dict = SETTINGS) -> dict:
    """`settings` with epochs=None replaced by the size-dependent default."""
    epochs = settings["epochs"] or (15 if image_size <= 16 else 8)
    return {**settings, "epochs": int(epochs)}


def content_hash(train_uint8: np.ndarray, train_labels, settings: dict = SETTINGS) -> str:
    """sha256 (first 16 hex digits) of the architecture, settings, images and labels."""
    settings = resolved_settings(train_uint8.shape[-1], settings)
    h = hashlib.sha256()
    h.update(json.dumps({"arch": ARCH_VERSION, **settings}, sort_keys=True).encode())
    h.update(str(train_uint8.shape).encode())
    h.update(np.ascontiguousarray(train_uint8, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(np.asarray(train_labels), dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def accuracy(model: SmallCNN, images_uint8, labels, batch: int = 512) -> float:
    """Share of images (N, C, H, W) uint8 whose argmax logit equals labels (N,)."""
    model.eval()
    x, y = to_input(images_uint8), torch.as_tensor(np.asarray(labels))
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).double().mean())


def train_classifier(train_uint8, train_labels, settings: dict = SETTINGS) -> SmallCNN:
    """Train SmallCNN with Adam on (N, C, H, W) uint8 images and (N,) labels; fixed seed.

    Light augmentation (random shifts by up to 1 pixel at 8x8, 2 at 28x28, zero-filled) helps it
    generalise from ~1600 images. Deterministic on CPU for a given torch version.
    """
    settings = resolved_settings(np.asarray(train_uint8).shape[-1], settings)
    x, y = to_input(train_uint8), torch.as_tensor(np.asarray(train_labels), dtype=torch.int64)
    n_classes = int(y.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        model = SmallCNN(x.shape[1], n_classes)
    g = torch.Generator().manual_seed(settings["seed"])
    opt = torch.optim.AdamW(
        model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"]
    )
    bs, epochs = settings["batch_size"], settings["epochs"]
    steps = epochs * ((len(x) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings["lr"], total_steps=steps)
    shift = max(1, x.shape[-1] // 12)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            xb = _shift(x[idx], shift, g)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        f = torch.cat([model.body(x[i : i + 512]) for i in range(0, len(x), 512)])
        model.feature_scale.fill_(float(f.square().mean().sqrt().clamp_min(1e-8)))
    return model


def _shift(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    """Translate the batch by one random (dy, dx) in [-s, s]^2, filling with the background -1."""
    dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,), generator=g))
    pad = nn.functional.pad(x, (s, s, s, s), value=-1.0)
    h, w = x.shape[-2:]
    return pad[..., s + dy : s + dy + h, s + dx : s + dx + w]


def load_or_train(
    train_uint8, train_labels, test_uint8, test_labels, cache_dir: Path
) -> tuple[SmallCNN, float, Path]:
    """The classifier for this training set: loaded from cache_dir if trained before, else trained
    and saved there. Returns (model in eval mode, test accuracy, cache file)."""
    key = content_hash(train_uint8, train_labels)
    path = Path(cache_dir) / f"classifier-{key}.pt"
    n_classes = int(np.asarray(train_labels).max()) + 1
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model = SmallCNN(train_uint8.shape[1], n_classes)
            model.load_state_dict(saved["state_dict"])
            model.eval()
            return model, float(saved["test_accuracy"]), path
        except Exception as e:  # a damaged cache file is retrained, never trusted
            log.warning(
                f"feature classifier cache {path} unreadable ({type(e).__name__}); retraining"
            )

    t0 = time.perf_counter()
    model = train_classifier(train_uint8, train_labels)
    acc = accuracy(model, test_uint8, test_labels)
    log.info(
        f"trained the feature classifier on {len(train_uint8)} images in "
        f"{time.perf_counter() - t0:.1f} s: test accuracy {acc:.4f}; cached in {path}"
    )
    state = {
        "state_dict": model.state_dict(),
        "test_accuracy": acc,
        "arch": ARCH_VERSION,
        "n_train": int(len(train_uint8)),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return model, acc, path
