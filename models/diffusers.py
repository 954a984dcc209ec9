"""diffusers' `UNet2DModel` folders (`save_pretrained`), run by diffusers' own code.

A pipeline folder holds `model_index.json`, `unet/config.json` + `unet/diffusion_pytorch_model.
safetensors` and `scheduler/scheduler_config.json`; the `unet/` folder alone works too (its
scheduler folder beside it). The scheduler names the noise process: DDPM's linear betas become a
VP SDE, score_sde's VE scheduler a VE SDE. The network is diffusers' own UNet2DModel (the optional
`diffusers` extra); weights are read from safetensors only, never from pickled `.bin` files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from sde_lib.errors import UserError

NEEDS_EXTRA = 'diffusers folders need the optional extra: pip install -e ".[diffusers]"'


class PretrainedError(UserError):
    """A released checkpoint that cannot be used, with the file and the reason named."""


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel as a network net(x, label) -> output.

    It receives data in the space its pipeline samples in: [-1, 1] for DDPM pipelines, [0, 1]
    for score_sde's VE pipelines (`unit_range`), mapped here from the toolkit's [-1, 1]."""

    def __init__(self, unet: nn.Module, unit_range: bool) -> None:
        super().__init__()
        self.unet, self.unit_range = unet, bool(unit_range)
        self.n_classes = 0

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.unit_range:
            x = (x + 1) / 2
        return self.unet(x, label).sample


def _diffusers_files(path: Path) -> tuple[Path, Path]:
    """(unet folder, scheduler config) of a pipeline folder or of its unet/ folder."""
    unet = path / "unet" if (path / "unet" / "config.json").is_file() else path
    scheduler = unet.parent / "scheduler" / "scheduler_config.json"
    if not (unet / "config.json").is_file():
        raise PretrainedError(
            f"{path} is not a diffusers folder (no config.json or unet/config.json); pass a "
            "folder written by save_pretrained"
        )
    if not (unet / "diffusion_pytorch_model.safetensors").is_file():
        raise PretrainedError(
            f"{unet} has no diffusion_pytorch_model.safetensors; only safetensors weights are "
            "read (pickled .bin files could run code): re-save with safe_serialization=True"
        )
    if not scheduler.is_file():
        raise PretrainedError(
            f"{unet}: no scheduler config at {scheduler}; it names the noise process"
        )
    return unet, scheduler


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise PretrainedError(f"{path} is not a JSON object")
    return value


def diffusers_process(path: str | Path) -> tuple[dict, dict]:
    """(sde config, model config) of a diffusers folder in the toolkit's [-1, 1] space:
    DDPMScheduler (linear betas, epsilon) -> VP with beta(t) = N beta_i and the discrete DDPM
    convention; ScoreSdeVeScheduler -> VE on [0, 1] data, every sigma doubled in [-1, 1]."""
    path = Path(path)
    unet, scheduler = _diffusers_files(path)
    s = _read_json(scheduler)
    name = s.get("_class_name")
    model = {"name": "diffusers", "path": str(path), "parameterisation": "score_sde"}
    if name in ("DDPMScheduler", "DDIMScheduler"):
        if s.get("beta_schedule", "linear") != "linear" or s.get("trained_betas"):
            raise PretrainedError(
                f"{scheduler}: beta_schedule={s.get('beta_schedule')!r}; only the linear DDPM "
                "schedule is a VP SDE here"
            )
        if s.get("prediction_type", "epsilon") != "epsilon":
            raise PretrainedError(
                f"{scheduler}: prediction_type={s.get('prediction_type')!r}; only epsilon-"
                "prediction models are read"
            )
        n = int(s.get("num_train_timesteps", 1000))
        sde = {"name": "vp", "beta_min": float(s["beta_start"]) * n}
        sde["beta_max"] = float(s["beta_end"]) * n
        return sde, {**model, "continuous": False, "num_scales": n, "centered": True}
    if name == "ScoreSdeVeScheduler":
        sde = {"name": "ve", "sigma_min": 2 * float(s["sigma_min"])}
        sde["sigma_max"] = 2 * float(s["sigma_max"])
        return sde, {**model, "continuous": True, "centered": False}
    raise PretrainedError(
        f"{scheduler}: scheduler {name!r} is not read; allowed: DDPMScheduler (linear, epsilon), "
        "ScoreSdeVeScheduler"
    )


def diffusers_network(path: str | Path, weights: bool = True) -> DiffusersUNet:
    """diffusers' UNet2DModel of a folder: with its weights, or built from its config only (for
    training, or to receive weights shared by another process)."""
    unet_dir, scheduler = _diffusers_files(Path(path))
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise PretrainedError(NEEDS_EXTRA) from None
    config = _read_json(unet_dir / "config.json")
    try:
        if weights:
            unet = UNet2DModel.from_pretrained(
                str(unet_dir), use_safetensors=True, low_cpu_mem_usage=False
            )
        else:
            unet = UNet2DModel.from_config(config)
    except Exception as e:  # diffusers raises many kinds for a bad folder
        raise PretrainedError(f"{unet_dir}: diffusers cannot build the UNet ({e})") from None
    unit_range = _read_json(scheduler).get("_class_name") == "ScoreSdeVeScheduler"
    return DiffusersUNet(unet, unit_range)


def diffusers_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The UNet's tensors of a diffusers folder, read from its safetensors file."""
    unet_dir, _ = _diffusers_files(Path(path))  # a folder of another kind: say that first
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise PretrainedError(NEEDS_EXTRA) from None
    file = unet_dir / "diffusion_pytorch_model.safetensors"
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{file} cannot be read: {e}") from None
