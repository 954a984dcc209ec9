"""Released checkpoints of the reference code, read without running anything found in a file.

score_sde_pytorch writes `checkpoint_*.pth` = torch.save({'optimizer', 'model', 'ema', 'step'}):
`model` is the state dict of nn.DataParallel(net) (keys `module.sigmas`, `module.all_modules.<i>.
<name>`: the network is one flat list of layers used in order), `ema` holds `shadow_params`, a list
over the *trainable* parameters in order (NCSN++'s frozen Fourier frequencies are not in it and come
from `model`). The file records no configuration: the user names the preset it was trained with.
`models.ncsnpp.NCSNpp` registers its layers in the order score_sde creates them, so the two state
dicts correspond one tensor after the other; the attention and shortcut projections score_sde
stores as (in, out) matrices (`NIN_*.W`) are 1x1 convolutions here. Loading is strict: every
tensor must be used and fit, or the file is refused with the first difference named (score_sde's
own `restore_checkpoint` loads with strict=False and so can silently keep random weights).

diffusers writes `save_pretrained` folders: a pipeline (`model_index.json`, `unet/config.json` +
`unet/diffusion_pytorch_model.safetensors`, `scheduler/scheduler_config.json`) or the `unet/`
folder alone (its scheduler folder beside it). Its own `UNet2DModel` runs the network (the optional
`diffusers` extra); weights are read from safetensors only, never from pickled `.bin` files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sde_lib import SDE, sde_from_config
from sde_lib.errors import UserError
from sde_lib.io import load_weights_only

from . import factory
from .score import ScoreSDEModel

CONF = Path(__file__).resolve().parents[1] / "conf"
SCORE_SDE_PARTS = ("model", "ema", "step")


class PretrainedError(UserError):
    """A released checkpoint that cannot be used, with the file and the reason named."""


class LayoutMismatch(PretrainedError):
    """The checkpoint's tensors do not fit the network built from the named configuration."""


# --------------------------------------------------------------------------- score_sde_pytorch


def read_score_sde(path: str | Path) -> dict:
    """{'model': state dict without the DataParallel prefix, 'shadow': EMA list, 'step': int}."""
    path = Path(path)
    try:
        state = load_weights_only(path)
    except ValueError as e:
        raise PretrainedError(f"checkpoint {path} cannot be loaded: {e}") from None
    if not is_score_sde_state(state):
        raise PretrainedError(
            f"checkpoint {path} is not a score_sde_pytorch checkpoint (expected a dict with "
            "'model', 'ema' {'shadow_params': [...]} and 'step')"
        )
    model = {k.removeprefix("module."): v for k, v in state["model"].items()}
    return {"model": model, "shadow": list(state["ema"]["shadow_params"]), "step": state["step"]}


def is_score_sde_state(state) -> bool:
    """Whether a loaded object has score_sde_pytorch's checkpoint layout."""
    return (
        isinstance(state, dict)
        and all(k in state for k in SCORE_SDE_PARTS)
        and "format_version" not in state
        and isinstance(state["model"], dict)
        and all(torch.is_tensor(v) for v in state["model"].values())
        and isinstance(state["ema"], dict)
        and isinstance(state["ema"].get("shadow_params"), (list, tuple))
        and all(torch.is_tensor(v) for v in state["ema"]["shadow_params"])
    )


def _frozen(key: str, value: torch.Tensor) -> bool:
    """NCSN++'s Gaussian Fourier frequencies: a parameter outside the EMA's list."""
    return key == "all_modules.0.W" and value.ndim == 1


def _as_ours(key: str, value: torch.Tensor) -> torch.Tensor:
    """score_sde's NIN layers store (in, out) matrices; here they are (out, in, 1, 1) convs."""
    if key.rsplit(".", 2)[-2].startswith("NIN_") and key.endswith(".W"):
        return value.t()[:, :, None, None]
    return value


def score_sde_weights(ckpt: dict, net: nn.Module, use_ema: bool = True) -> dict:
    """The state dict of `net` holding a `read_score_sde` checkpoint's EMA (or raw) weights.
    LayoutMismatch naming the first tensor that does not fit."""
    theirs = [(k, v) for k, v in ckpt["model"].items() if k != "sigmas"]
    if use_ema:
        trainable = [i for i, (k, v) in enumerate(theirs) if not _frozen(k, v)]
        if len(trainable) != len(ckpt["shadow"]):
            raise LayoutMismatch(
                f"its EMA holds {len(ckpt['shadow'])} tensors for {len(trainable)} trainable "
                "parameters of its model"
            )
        theirs = list(theirs)
        for i, v in zip(trainable, ckpt["shadow"]):
            theirs[i] = (theirs[i][0], v)
    mine = list(net.state_dict().items())
    out = {}
    for (tk, tv), (mk, mv) in zip(theirs, mine):
        v = _as_ours(tk, tv)
        if v.shape != mv.shape:
            raise LayoutMismatch(
                f"its {tk} {tuple(tv.shape)} does not fit {mk} {tuple(mv.shape)} "
                f"(tensor {len(out) + 1} of {len(theirs)})"
            )
        out[mk] = v.to(mv.dtype)
    if len(theirs) != len(mine):
        more, n = ("unexpected", len(theirs)) if len(theirs) > len(mine) else ("missing", len(mine))
        first = theirs[len(mine)][0] if more == "unexpected" else mine[len(theirs)][0]
        raise LayoutMismatch(
            f"it holds {len(theirs)} tensors where the network has {len(mine)} "
            f"({more} from {first}, {n - min(len(theirs), len(mine))} in all)"
        )
    return out


# --------------------------------------------------------------------------- diffusers


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
    """diffusers' UNet2DModel of a folder (its weights, or initialised from its config only)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise PretrainedError(
            'diffusers checkpoints need the optional extra: pip install -e ".[diffusers]"'
        ) from None
    unet_dir, scheduler = _diffusers_files(Path(path))
    config = _read_json(unet_dir / "config.json")
    try:
        if weights:
            unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True)
        else:
            unet = UNet2DModel.from_config(config)
    except Exception as e:  # diffusers raises many kinds for a bad folder
        raise PretrainedError(f"{unet_dir}: diffusers cannot build the UNet ({e})") from None
    unit_range = _read_json(scheduler).get("_class_name") == "ScoreSdeVeScheduler"
    return DiffusersUNet(unet, unit_range)


# --------------------------------------------------------------------------- presets


def preset_names() -> list[str]:
    """The paper presets: `python run.py +experiment=<name>`."""
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose(experiment: str | None = None, overrides: Sequence[str] = ()) -> dict:
    """The resolved config `python run.py +experiment=<experiment> <overrides>` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args = [*([f"+experiment={experiment}"] if experiment else []), *overrides]
    try:
        if GlobalHydra.instance().is_initialized():  # inside run.py: its config folder is ours
            cfg = hydra_compose("config", overrides=args)
        else:
            with initialize_config_dir(str(CONF), version_base="1.3"):
                cfg = hydra_compose("config", overrides=args)
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedError(
            f"configuration {' '.join(args) or '(defaults)'} cannot be composed: {first}; "
            f"presets: {', '.join(preset_names())}"
        ) from None


def image_shape(data: dict) -> tuple[int, int, int]:
    """(C, H, W) of a data config that names its image size (data.image_size, data.channels)."""
    size = data.get("image_size")
    if not isinstance(size, int) or size < 1:
        raise PretrainedError(
            f"data={data.get('name')} does not state an image size; pass data.image_size=N"
        )
    return (int(data.get("channels", 3)), size, size)


def fitting_presets(ckpt: dict, overrides: Sequence[str] = ()) -> list[str]:
    """The presets (with `overrides`) whose network the checkpoint's tensors fit, built on the
    meta device (no memory, no time)."""
    fits = []
    for name in preset_names():
        try:
            cfg = compose(name, overrides)
            with torch.device("meta"):
                net = factory.network(cfg["model"], image_shape(cfg["data"]), "images")
            score_sde_weights(ckpt, net, use_ema=False)
        except UserError:
            continue
        fits.append(name)
    return fits


def load_pretrained(
    path: str | Path,
    experiment: str | None = None,
    overrides: Sequence[str] = (),
    *,
    use_ema: bool = True,
) -> tuple[nn.Module, SDE]:
    """(score_model, sde) of a released checkpoint; score_model(x, t) is the score of `sde` on
    data in [-1, 1], ready for `samplers.sample` and `likelihood.log_likelihood`.

    path: a score_sde_pytorch `checkpoint_*.pth` (then `experiment` names the preset it was
    trained with, e.g. "cifar10_ddpmpp_cont_vp", and `overrides` are run.py-style changes such
    as "model.nf=8" or "data.image_size=16") or a diffusers folder (which states its own
    configuration). Uses the EMA weights unless use_ema=False."""
    path = Path(path).expanduser()
    if path.is_dir():
        sde_cfg, model_cfg = diffusers_process(path)
        sde = sde_from_config(sde_cfg)
        net = diffusers_network(path)
        return factory.score_model(model_cfg, net, sde, process=sde_cfg["name"]).eval(), sde
    if not path.is_file():
        raise PretrainedError(f"{path} does not exist; pass a checkpoint file or folder")
    ckpt = read_score_sde(path)
    if experiment is None:
        fits = fitting_presets(ckpt, overrides)
        raise PretrainedError(
            f"{path} records no configuration; name its preset with experiment=... "
            f"(presets whose shapes fit: {', '.join(fits) or 'none'})"
        )
    cfg = compose(experiment, overrides)
    sde = sde_from_config(cfg["sde"])
    net = factory.network(cfg["model"], image_shape(cfg["data"]), "images")
    try:
        net.load_state_dict(score_sde_weights(ckpt, net, use_ema))
    except LayoutMismatch as e:
        fits = fitting_presets(ckpt, overrides)
        raise LayoutMismatch(
            f"checkpoint {path} does not fit +experiment={experiment} "
            f"{' '.join(overrides)}: {e}; presets whose shapes fit: {', '.join(fits) or 'none'}"
        ) from None
    model = factory.score_model(cfg["model"], net, sde, process=cfg["sde"]["name"])
    if not isinstance(model, ScoreSDEModel):
        raise PretrainedError(
            f"+experiment={experiment} sets model.parameterisation="
            f"{cfg['model'].get('parameterisation')}; score_sde checkpoints need score_sde"
        )
    return model.eval(), sde
