"""Feature networks for image metrics: a trained classifier, Inception-v3, raw pixels or a user's.

A `Features` maps uint8 images (N, C, H, W) to float64 features (N, D) in batches and carries its
`name`, the classifier's test `accuracy` (None for the others) and a cache `key` (None when the
features cannot be cached, e.g. a user's module). `build_features` picks one from `eval.features`:

  auto        the classifier for labelled data (digits, mnist); Inception-v3 for 3-channel data
              when its weights file is given (or found at <outputs_root>/features/<WEIGHTS_NAME>);
              else raw pixels, with one log line saying what to download and where to put it
  classifier  the SmallCNN of `metrics.classifier` (needs a labelled data set)
  inception   the FID Inception-v3 of `metrics.inception` (needs the weights file)
  pixels      the images themselves, flattened and scaled to [0, 1]
  pkg.mod:fn  fn() returns a callable (or nn.Module) mapping float images (N, C, H, W) in [0, 1]
              to (N, D) features
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sde_lib.errors import UserError

from .classifier import load_or_train
from .inception import WEIGHTS_HINT, WEIGHTS_NAME, InceptionWeightsError, load_fid_inception

log = logging.getLogger(__name__)

FEATURE_CHOICES = ("auto", "classifier", "inception", "pixels")


@dataclass
class Features:
    name: str
    fn: object  # float32 tensor (B, C, H, W) in [0, 1] -> (B, D)
    accuracy: float | None = None
    key: str | None = None
    device: str = "cpu"
    batch: int = 256

    def __call__(self, images_uint8) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> float64 features (N, D) on the CPU."""
        x = np.asarray(images_uint8)
        out = []
        with torch.no_grad():
            for i in range(0, len(x), self.batch):
                b = torch.from_numpy(np.ascontiguousarray(x[i : i + self.batch])).float() / 255
                f = torch.as_tensor(self.fn(b.to(self.device)))
                out.append(f.reshape(f.shape[0], -1).double().cpu())
        return torch.cat(out) if out else torch.empty(0, 0, dtype=torch.float64)


def pixel_features() -> Features:
    return Features("pixels", lambda b: b.flatten(1), key="pixels")


def _user_error(msg: str):
    return UserError(msg)


def user_features(spec: str) -> Features:
    """Features from `package.module:factory`; factory() returns the feature callable."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise _user_error(f"eval.features={spec!r}: give a module path as package.module:factory")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:
        raise _user_error(
            f"eval.features={spec}: cannot import {mod_name} ({type(e).__name__}: {e})"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise _user_error(f"eval.features={spec}: {mod_name} has no callable {attr!r}")
    try:
        fn = factory()
    except Exception as e:
        raise _user_error(
            f"eval.features={spec}: {attr}() failed ({type(e).__name__}: {e})"
        ) from None
    if not callable(fn):
        raise _user_error(
            f"eval.features={spec}: {attr}() returned a {type(fn).__name__}, not a callable"
        )
    if isinstance(fn, torch.nn.Module):
        fn.eval()
    return Features(getattr(fn, "name", spec), fn, key=None, batch=64)


def classifier_features(
    train_u8, train_labels, test_u8, test_labels, cache_dir: Path, device: str = "cpu"
) -> Features:
    """The penultimate layer of the toolkit's classifier (trained once, cached by content hash)."""

    model, acc, path = load_or_train(train_u8, train_labels, test_u8, test_labels, cache_dir)
    model = model.to(device)
    return Features(
        "classifier",
        lambda b: model.features(b * 2 - 1),
        accuracy=acc,
        key=path.stem,
        device=device,
    )


def inception_features(weights: Path, device: str = "cpu") -> Features:
    """Inception-v3 pool3 features (2048-D) from the FID weights file; InceptionWeightsError
    becomes a one-line UserError."""

    try:
        model = load_fid_inception(weights).to(device)
    except InceptionWeightsError as e:
        raise _user_error(str(e)) from None
    h = hashlib.sha256()
    with open(Path(weights).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    # the reference cache is keyed by the weights' content, not their file name
    return Features(
        "inception-v3 (FID pool3)",
        model,
        key=f"inception-{h.hexdigest()[:16]}",
        device=device,
        batch=50,
    )


def default_weights_path(outputs_root) -> Path:

    return Path(outputs_root) / "features" / WEIGHTS_NAME


def build_features(dataset, train_u8, test_u8, cfg: dict) -> Features:
    """The feature network named by cfg["eval"]["features"] for this data set (see module doc)."""

    e = cfg.get("eval") or {}
    choice = str(e.get("features") or "auto")
    root = Path(cfg.get("outputs_root", "outputs"))
    device = _device(cfg)
    weights = e.get("inception_weights")
    if weights is None and default_weights_path(root).is_file():
        weights = default_weights_path(root)
    labels = getattr(dataset, "labels", None)
    if choice == "auto":
        if labels is not None:
            choice = "classifier"
        elif train_u8.shape[1] == 3 and weights is not None:
            choice = "inception"
        else:
            if train_u8.shape[1] == 3:
                log.info(
                    f"no Inception-v3 weights: FID is not computed and KID/precision/recall use "
                    f"raw pixels; for FID download {WEIGHTS_HINT} to {default_weights_path(root)}"
                    " or pass eval.inception_weights=PATH"
                )
            choice = "pixels"
    if choice == "classifier":
        if labels is None:
            raise _user_error(
                f"eval.features=classifier needs a labelled data set (digits, "
                f"mnist); data={dataset.name} has no labels; use auto or pixels"
            )
        return classifier_features(
            train_u8,
            labels["train"].numpy(),
            test_u8,
            labels["test"].numpy(),
            root / "features",
            device,
        )
    if choice == "inception":
        if weights is None:
            raise _user_error(
                f"eval.features=inception needs the weights: download "
                f"{WEIGHTS_HINT} and pass eval.inception_weights=PATH (or put it "
                f"at {default_weights_path(root)})"
            )
        return inception_features(Path(weights), device)
    if choice == "pixels":
        return pixel_features()
    return user_features(choice)


def _device(cfg: dict) -> str:
    d = cfg.get("device", "cpu")
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return d
