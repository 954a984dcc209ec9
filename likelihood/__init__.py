"""Likelihoods of score-based models: PF-ODE log p(x), the reverse SDE's ELBO, bits per dim."""

from .divergence import draw_probes, exact_divergence, hutchinson_divergence
from .elbo import elbo
from .ode import (
    LikelihoodResult,
    SampleDensity,
    log_likelihood,
    log_likelihood_stats,
    sample_log_density,
)
from .units import bits_per_dim, dequantize, dequantized_bpd

__all__ = [
    "LikelihoodResult",
    "bits_per_dim",
    "dequantize",
    "dequantized_bpd",
    "draw_probes",
    "elbo",
    "exact_divergence",
    "hutchinson_divergence",
    "log_likelihood",
    "log_likelihood_stats",
    "sample_log_density",
    "SampleDensity",
]
