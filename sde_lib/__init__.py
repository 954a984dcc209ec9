"""Forward SDEs for score-based generative modelling: VP, sub-VP, VE and VDM (learned schedule)."""

from .base import SDE, ReverseSDE, ScoreFn, append_dims
from .flow import RectifiedFlowSDE, TrigFlowSDE
from .noise import KeyedNoise, TorchNoise, as_noise, randn_like
from .vdm import VDMSDE, GammaSchedule
from .ve import VESDE
from .vp import VPSDE, subVPSDE

SDE_CLASSES = {
    "vp": VPSDE,
    "subvp": subVPSDE,
    "ve": VESDE,
    "vdm": VDMSDE,
    "rectified": RectifiedFlowSDE,
    "trig": TrigFlowSDE,
}


def sde_from_config(c: dict) -> SDE:
    """The SDE an `sde` config names ({"name": "vp", "beta_min": ...}); ValueError naming the
    config when the name or a parameter is refused."""
    name = c.get("name")
    if name not in SDE_CLASSES:
        raise ValueError(f"sde={name!r} is not known; allowed: {', '.join(SDE_CLASSES)}")
    params = {k: v for k, v in c.items() if k != "name"}
    try:
        return SDE_CLASSES[name](**params)
    except (TypeError, ValueError) as e:
        given = ", ".join(f"sde.{k}={v}" for k, v in params.items())
        raise ValueError(f"sde={name} ({given}): {e}") from None


__all__ = [
    "SDE",
    "SDE_CLASSES",
    "sde_from_config",
    "ReverseSDE",
    "ScoreFn",
    "append_dims",
    "VPSDE",
    "subVPSDE",
    "VESDE",
    "VDMSDE",
    "RectifiedFlowSDE",
    "TrigFlowSDE",
    "GammaSchedule",
    "KeyedNoise",
    "TorchNoise",
    "as_noise",
    "randn_like",
]
