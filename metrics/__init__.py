"""Sample-quality measures: two-sample distances and mixture weights for known laws
(`metrics.quality`), and image metrics (`metrics.images`: FID, KID, precision/recall,
memorisation) over feature networks (`metrics.features`)."""

from .fid import fid_from_features, frechet_distance, gaussian_fit
from .kid import kid, mmd2_unbiased
from .neighbours import memorisation, precision_recall
from .quality import (
    assign_components,
    component_weights,
    mmd,
    sliced_wasserstein,
    weight_z_scores,
)

__all__ = [
    "assign_components",
    "component_weights",
    "fid_from_features",
    "frechet_distance",
    "gaussian_fit",
    "kid",
    "memorisation",
    "mmd",
    "mmd2_unbiased",
    "precision_recall",
    "sliced_wasserstein",
    "weight_z_scores",
]
