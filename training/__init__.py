"""Losses, the training loop, EMA, checkpoints and torch.distributed set-up."""

from .ema import EMA
from .loop import NonFiniteError, TrainResult, TrainSettings, train
from .losses import LOSSES, DiscreteDSMLoss, DSMLoss, SSMLoss, VLBLoss, make_loss

__all__ = [
    "EMA",
    "NonFiniteError",
    "TrainResult",
    "TrainSettings",
    "train",
    "LOSSES",
    "DiscreteDSMLoss",
    "DSMLoss",
    "SSMLoss",
    "VLBLoss",
    "make_loss",
]
