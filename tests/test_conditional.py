"""Conditional and controllable generation (issue 13): exact conditional references, classifier-
free and classifier guidance, labels in training batches, conditional digits from run.py,
inpainting and colourisation, and bad input as one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from runs import compose_cfg, run_mode

from data.mixtures import mixture5d
from models import MixtureClassifier, MixtureScore
from samplers.guidance import GuidedScore
from sde_lib import VPSDE
from tasks import UserError, dispatch

N = 4000  # samples per law check: the standard error of a variance ratio is sqrt(2 / N) = 0.022


def _check_component_law(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Mean within 4.5 standard errors per coordinate, variances within 4.5 standard errors of a
    sample variance (plus the 500-step sampler's ~3% bias), correlations within 4.5 / sqrt(N)."""
    n = x.shape[0]
    z = (x.mean(0) - mean) / (var / n).sqrt()
    assert z.abs().max() < 4.5, z
    ratio = x.var(0) / var
    assert (ratio - 1).abs().max() < 4.5 * math.sqrt(2 / n) + 0.03, ratio
    corr = torch.corrcoef(x.T) - torch.eye(x.shape[1], dtype=x.dtype)
    assert corr.abs().max() < 4.5 / math.sqrt(n), corr


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve"])
def test_exact_conditional_and_exact_classifier_reproduce_the_component(tmp_path, sde):
    """model=exact with sampler.class_label=k (guidance 0) samples component k; classifier
    guidance at scale 1 with the exact p_t(y | x) on the exact unconditional score does too."""
    mix, k = mixture5d(), 2
    run = ("mode=sample", "data=mix5d", "model=exact", f"sde={sde}", "sampler=pc",
           "sampler.steps=500", "sampler.corrector=none", f"sampler.n_samples={N}",
           f"sampler.batch_size={N}", f"sampler.class_label={k}")  # fmt: skip
    for name, extra in (("cfg", ("sampler.guidance=0",)),
                        ("clf", ("sampler.classifier=exact", "sampler.classifier_scale=1"))):
        m, out = run_mode(tmp_path, name, *run, *extra)
        x = torch.from_numpy(np.load(out / "samples.npz")["samples_model_space"]).double()
        _check_component_law(x, mix.means[k], mix.variances[k])
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["class_label"] == k and saved["conditional_accuracy"][str(k)] > 0.99
        assert saved["guidance_method"] == ("conditional" if name == "cfg" else "classifier")
        assert m["nfe"] == 501  # 500 predictor steps + the denoising step


def test_exact_references_are_closed_form():
    """The conditional score is the perturbed component's Gaussian score, the classifier's
    log-probabilities sum to one and equal log w_y N_y / p_t, and s + grad log p_t(y|x) is the
    conditional score (autograd through the classifier)."""
    torch.manual_seed(0)
    sde, mix = VPSDE(), mixture5d()
    x, t = torch.randn(64, 5, dtype=torch.float64), torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    y = torch.randint(0, 3, (64,))
    alpha, sigma = sde.alpha_sigma(t)
    a, s = alpha[:, None], sigma[:, None]
    var = a**2 * mix.variances[y] + s**2
    want = (a * mix.means[y] - x) / var
    score = MixtureScore(sde, mix)
    assert torch.allclose(score(x, t, y), want, atol=1e-10)
    assert torch.allclose(score(x, t, torch.full_like(y, -1)), score(x, t), atol=1e-12)
    clf = MixtureClassifier(sde, mix)
    logp = clf(x, t)
    assert torch.allclose(logp.exp().sum(1), torch.ones(64, dtype=torch.float64))
    guided = GuidedScore(score, y, classifier=clf, classifier_scale=1.0)
    assert torch.allclose(guided(x, t), want, atol=1e-8)


def test_classifier_free_guidance_is_one_batched_call():
    """w != 0: one call of the wrapper = one network call on 2B rows = one NFE; the result is
    (1 + w) s(x|y) - w s(x)."""
    calls = []

    class Net(torch.nn.Module):
        n_classes = 3

        def forward(self, x, t, y=None):
            calls.append(x.shape[0])
            yy = torch.zeros(x.shape[0]) if y is None else y.float()
            return x * 0 + yy[:, None]  # the "score" is the label (null class -1)

    x, t, y = torch.zeros(4, 2), torch.full((4,), 0.5), torch.tensor([0, 1, 2, 1])
    out = GuidedScore(Net(), y, guidance=2.0)(x, t)
    assert calls == [8]
    assert torch.allclose(out, (3.0 * y.float() - 2.0 * -1.0)[:, None].expand(4, 2))
    import samplers

    _, nfe = samplers.sample(VPSDE(), GuidedScore(Net(), y, guidance=2.0), (4, 2), "em", 10)
    assert nfe == 11  # the same count as unguided sampling


def test_user_errors_are_one_line(tmp_path):
    base = ("mode=sample", "data=gmm8", "model=exact", "sampler=em", "sampler.steps=5",
            "sampler.n_samples=8", "sampler.batch_size=8")  # fmt: skip
    out = tmp_path / "o"
    cases = [
        (("sampler.class_label=8",), "out of range"),
        (("sampler.class_label=[1,2]",), "one per"),
        (("sampler.guidance=1",), "class_label"),
        (("sampler.classifier=exact",), "class_label"),
        (("sampler.class_label=-1",), "sampler.class_label"),
        (("sampler.task=bogus",), "sampler.task"),
    ]
    for extra, words in cases:
        with pytest.raises(UserError, match=words) as e:
            dispatch(compose_cfg(tmp_path, *base, *extra), out)
        assert "\n" not in str(e.value)
