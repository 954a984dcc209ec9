"""Forward SDEs for score-based generative modelling: VP, sub-VP and VE."""

from .base import SDE, ReverseSDE, ScoreFn, append_dims
from .noise import KeyedNoise, TorchNoise, as_noise, randn_like
from .ve import VESDE
from .vp import VPSDE, subVPSDE

__all__ = [
    "SDE",
    "ReverseSDE",
    "ScoreFn",
    "append_dims",
    "VPSDE",
    "subVPSDE",
    "VESDE",
    "KeyedNoise",
    "TorchNoise",
    "as_noise",
    "randn_like",
]
