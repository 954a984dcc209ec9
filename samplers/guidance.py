"""Guided scores: one wrapper around a conditional score model, so every sampler can use it.

Classifier-free guidance (Ho & Salimans 2022), with the conditional and the unconditional score
of one network (the null class, label -1):

    s_w(x, t | y) = (1 + w) s(x, t | y) - w s(x, t)

w = 0 is plain conditional sampling (one network call on B rows); for w != 0 the two scores come
from ONE batched network call on 2B rows (x twice, labels y and the null class), so each call
of the wrapper counts as one score evaluation (NFE) but costs about two unguided evaluations.

Classifier guidance (Song et al. 2021, Sec. 5 and App. I.4; Dhariwal & Nichol 2021) with a
time-dependent classifier log p_t(y | x):

    s_c(x, t | y) = s(x, t) + c grad_x log p_t(y | x)

c = 1 gives the score of p_t(x | y) when s and p_t(y | x) are exact. The classifier's gradient is
one more network call (forward and backward) per evaluation; `classifier_evals` counts them.

Samplers see a plain score_fn(x, t): they stay unaware of labels and guidance.
"""

from __future__ import annotations

import torch
from torch import nn

from sde_lib import KeyedNoise

NULL_CLASS = -1  # the label of "no class": the unconditional score of a conditional network


class GuidedScore:
    """score_fn(x, t) for a fixed batch of labels (B,), with classifier-free and/or classifier
    guidance. `model(x, t, y)` must accept labels (y = -1 the null class); `classifier(x, t)`
    returns logits or log-probabilities (B, K)."""

    def __init__(
        self,
        model: nn.Module,
        labels: torch.Tensor,
        guidance: float = 0.0,
        classifier: nn.Module | None = None,
        classifier_scale: float = 1.0,
    ) -> None:
        self.model = model
        self.labels = labels.long()
        self.guidance = float(guidance)
        self.classifier = classifier
        self.classifier_scale = float(classifier_scale)
        self.classifier_evals = 0

    def _labels(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"guided score built for {self.labels.shape[0]} labels, called on a batch of "
                f"{x.shape[0]}"
            )
        return self.labels.to(x.device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self._labels(x)
        if self.classifier is not None:
            score = self.model(x, t)  # the unconditional score
            return score + self.classifier_scale * self.classifier_grad(x, t, y)
        if self.guidance == 0.0:
            return self.model(x, t, y)
        both = self.model(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_CLASS)])
        )
        cond, uncond = both.chunk(2)
        return (1.0 + self.guidance) * cond - self.guidance * uncond

    def classifier_grad(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(y | x) for each row (B, *D), with autograd (samplers run without it)."""
        self.classifier_evals += 1
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = torch.log_softmax(self.classifier(xg, t).double(), dim=1)
            picked = logp.gather(1, y.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(picked, xg)
        return grad.to(x.dtype)


def label_batch(spec, indices: torch.Tensor, n_classes: int, seed: int) -> torch.Tensor:
    """The labels (b,) of the samples with these global indices for `sampler.class_label`:
    an int (all the same), a list (one per sample, by global index) or 'random' (uniform over
    the classes, keyed by (seed, global index), so independent of batch size and processes)."""

    idx = torch.as_tensor(indices, dtype=torch.int64)
    if spec == "random":
        noise = KeyedNoise.for_indices(int(seed), idx, LABEL_STREAM)
        return noise.randint(n_classes, (idx.numel(),), device=idx.device)
    if isinstance(spec, (list, tuple)):
        return torch.as_tensor([int(v) for v in spec], dtype=torch.int64)[idx.cpu()].to(idx)
    return torch.full_like(idx, int(spec))


LABEL_STREAM = 0x6C61626C  # key word of the per-sample random labels
