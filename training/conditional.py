"""Objectives with class labels: the class-conditional score (with label dropout) and the
noise-conditional classifier p_t(y | x) for classifier guidance.

Both keep the loss API of `training.losses`, loss(score_fn, x0, noise, labels=None) -> (B,), and
draw every random number from the noise source they are given, so that with the training loop's
`KeyedNoise` each example's draws depend only on (seed, step, position in the global batch).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from sde_lib import SDE, KeyedNoise, append_dims, as_noise

NULL_CLASS = -1  # the null class of a conditional network (its unconditional score)
DROPOUT_WORD = 0x64726F70  # derives the label-dropout stream from an example's training key


class _WithLabels:
    """score_fn(x, t) = model(x, t, y) for a fixed batch of labels; other attributes of the
    model (e.g. a learned noise schedule) are passed through."""

    def __init__(self, model, y: torch.Tensor) -> None:
        self._model, self._y = model, y

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._model(x, t, self._y)

    def __getattr__(self, name):
        return getattr(self._model, name)


def dropout_uniforms(noise, n: int, device) -> torch.Tensor:
    """(n,) uniforms deciding label dropout: from a stream derived from each example's key when
    `noise` is a KeyedNoise (so the loss's own draws of t and z are untouched), else the next
    draw of the source."""
    if isinstance(noise, KeyedNoise):
        return noise.derive(DROPOUT_WORD).rand((n,), device=device)
    return as_noise(noise).rand((n,), device=device)


class ConditionalLoss:
    """A score loss trained on the class-conditional score s(x, t | y) of one network; with
    probability `label_dropout` (decided per example) the label is replaced by the null class,
    so the same network also learns the unconditional score s(x, t) (Ho & Salimans 2022).
    Without labels it is the wrapped loss unchanged."""

    def __init__(self, loss, label_dropout: float = 0.1) -> None:
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        self.loss, self.label_dropout = loss, float(label_dropout)

    def __call__(self, score_fn, x0: torch.Tensor, noise=None, labels: torch.Tensor | None = None):
        if labels is None:
            return self.loss(score_fn, x0, noise)
        y = labels.to(x0.device).long()
        if self.label_dropout > 0:
            drop = dropout_uniforms(noise, x0.shape[0], x0.device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
        return self.loss(_WithLabels(score_fn, y), x0, noise)


class ClassifierLoss:
    """Cross-entropy of a noise-conditional classifier on perturbed data: t ~ U(eps, T),
    x_t = alpha(t) x_0 + sigma(t) z, loss = -log p_t(y | x_t) per example (B,)."""

    def __init__(self, sde: SDE, eps: float = 1e-5) -> None:
        self.sde, self.eps = sde, eps

    def __call__(
        self, classifier, x0: torch.Tensor, noise=None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if labels is None:
            raise ValueError("the classifier objective needs labels")
        src = as_noise(noise)
        u = src.rand((x0.shape[0],), dtype=x0.dtype, device=x0.device)
        t = self.eps + (self.sde.T - self.eps) * u
        z = src.randn(x0.shape, dtype=x0.dtype, device=x0.device)
        alpha, sigma = self.sde.alpha_sigma(t)
        xt = (
            append_dims(alpha.to(x0.dtype), x0.ndim) * x0
            + append_dims(sigma.to(x0.dtype), x0.ndim) * z
        )
        logits = classifier(xt, t)
        return F.cross_entropy(logits.float(), labels.to(x0.device).long(), reduction="none")
