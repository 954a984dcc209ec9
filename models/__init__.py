"""Score networks (architectures), the score parameterisation and the exact mixture reference."""

from .exact import GaussianMixture, MixtureScore
from .mlp import MLP
from .score import ScoreModel
from .unet import UNet

__all__ = ["GaussianMixture", "MixtureScore", "MLP", "ScoreModel", "UNet"]
