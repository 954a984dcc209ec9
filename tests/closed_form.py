"""Closed-form cases shared by the tests: SDEs and Gaussian-mixture laws with exact scores."""

from __future__ import annotations

from data.mixtures import gmm8, mixture5d
from models.exact import GaussianMixture, MixtureScore
from sde_lib import SDE, VESDE, VPSDE, subVPSDE

SDES: dict[str, type[SDE]] = {"vp": VPSDE, "subvp": subVPSDE, "ve": VESDE}


def make_sde(name: str) -> SDE:
    return SDES[name]()


def exact_score(sde: SDE, mixture: GaussianMixture) -> MixtureScore:
    return MixtureScore(sde, mixture)


__all__ = ["SDES", "make_sde", "exact_score", "gmm8", "mixture5d", "GaussianMixture"]
