"""Forward SDEs for score-based generative modelling: VP, sub-VP, VE and VDM (learned schedule)."""

from .base import SDE, ReverseSDE, ScoreFn, append_dims
from .noise import KeyedNoise, TorchNoise, as_noise, randn_like
from .vdm import VDMSDE, GammaSchedule
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
    "VDMSDE",
    "GammaSchedule",
    "KeyedNoise",
    "TorchNoise",
    "as_noise",
    "randn_like",
]
