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

    @torch.no_grad()
    def update(self, model: nn.Module, n_updates: int, mask: torch.Tensor | None = None) -> None:
        """One EMA step; with a boolean 0-dim `mask` that is False it changes nothing (decided
        on the device, without a host round trip)."""
        d = min(self.decay, (1 + n_updates) / (10 + n_updates))
        params = list(self.shadow.parameters())
        if mask is None:
            torch._foreach_lerp_(params, [p.detach() for p in model.parameters()], 1.0 - d)
        else:
            w = mask.to(params[0].dtype) * (1.0 - d) if params else None
            for e, p in zip(params, model.parameters()):
                e.lerp_(p.detach(), w)
        for e, b in zip(self.shadow.buffers(), model.buffers()):
            e.copy_(b if mask is None else torch.where(mask, b, e))

    def state_dict(self) -> dict:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state)
