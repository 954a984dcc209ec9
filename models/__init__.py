"""Score networks (architectures), the score parameterisations, released checkpoints and the exact
mixture reference."""

from .exact import GaussianMixture, MixtureClassifier, MixtureScore
from .mlp import MLP
from .ncsnpp import NCSNpp
from .pretrained import load_pretrained
from .score import ScoreModel, ScoreSDEModel
from .unet import UNet

__all__ = [
    "GaussianMixture",
    "MixtureClassifier",
    "MixtureScore",
    "MLP",
    "NCSNpp",
    "ScoreModel",
    "ScoreSDEModel",
    "UNet",
    "load_pretrained",
]
