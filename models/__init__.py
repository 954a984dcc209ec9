"""Score networks (architectures), the score parameterisation and the exact mixture reference."""

from .exact import GaussianMixture, MixtureClassifier, MixtureScore
from .mlp import MLP
from .score import ScoreModel
from .unet import UNet

__all__ = ["GaussianMixture", "MixtureClassifier", "MixtureScore", "MLP", "ScoreModel", "UNet"]
