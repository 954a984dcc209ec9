"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps `shadow` = d * shadow + (1 - d) * params after each update.

    d = min(decay, (1 + n) / (10 + n)) after n updates, so the average forgets the random
    initialisation within a few hundred steps instead of 1 / (1 - decay) of them.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = None  # (model, shadow params, model params), cached for the update

    @torch.no_grad()
    def update(self, model: nn.Module, n_updates: int, mask: torch.Tensor | None = None) -> None:
        """One EMA step; with a boolean 0-dim `mask` that is False it changes nothing (decided
        on the device, without a host round trip)."""
        d = min(self.decay, (1 + n_updates) / (10 + n_updates))
        if self._pairs is None or self._pairs[0] is not model:
            shadow = list(self.shadow.parameters())
            self._pairs = (model, shadow, list(model.parameters()))
        _, shadow, params = self._pairs
        if shadow:
            w = 1.0 - d if mask is None else mask.to(shadow[0].dtype) * (1.0 - d)
            torch._foreach_lerp_(shadow, params, w)
        for e, b in zip(self.shadow.buffers(), model.buffers()):
            e.copy_(b if mask is None else torch.where(mask, b, e))

    def state_dict(self) -> dict:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state)
