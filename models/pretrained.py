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

diffusers folders are read by `models.diffusers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sde_lib import SDE, sde_from_config
from sde_lib.errors import UserError
from sde_lib.io import load_weights_only

from . import factory
from .diffusers import PretrainedError, diffusers_network, diffusers_process
from .edm import edm_config, edm_weights, is_pickle, read_edm_snapshot
from .score import ScoreSDEModel

CONF = Path(__file__).resolve().parents[1] / "conf"
SCORE_SDE_PARTS = ("model", "ema", "step")


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


# --------------------------------------------------------------------------- presets


def preset_names() -> list[str]:
    """The paper presets: `python run.py +experiment=<name>`."""
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose(experiment: str | None = None, overrides: Sequence[str] = ()) -> dict:
    """The resolved config `python run.py +experiment=<experiment> <overrides>` would run with."""
    return compose_many([experiment], overrides)[0]


def compose_many(experiments: Sequence[str | None], overrides: Sequence[str] = ()) -> list[dict]:
    """`compose` of several presets under one Hydra initialisation (a tenth of the time)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def one(experiment: str | None) -> dict:
        args = [*([f"+experiment={experiment}"] if experiment else []), *overrides]
        try:
            cfg = hydra_compose("config", overrides=args)
            return OmegaConf.to_container(cfg, resolve=True)
        except (HydraException, OmegaConfBaseException) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PretrainedError(
                f"configuration {' '.join(args) or '(defaults)'} cannot be composed: {first}; "
                f"presets: {', '.join(preset_names())}"
            ) from None

    if GlobalHydra.instance().is_initialized():  # inside run.py: its config folder is ours
        return [one(e) for e in experiments]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return [one(e) for e in experiments]


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
    names = preset_names()
    for name, cfg in zip(names, compose_many(names, overrides)):
        try:
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
    as "model.nf=8" or "data.image_size=16"), an EDM `network-snapshot-*.pkl` or a diffusers
    folder (these two state their own configuration). Uses the EMA weights unless use_ema=False."""
    path = Path(path).expanduser()
    if path.is_dir():
        sde_cfg, model_cfg = diffusers_process(path)
        sde = sde_from_config(sde_cfg)
        net = diffusers_network(path)
        return factory.score_model(model_cfg, net, sde, process=sde_cfg["name"]).eval(), sde
    if not path.is_file():
        raise PretrainedError(f"{path} does not exist; pass a checkpoint file or folder")
    if is_pickle(path):  # an EDM snapshot states its own configuration
        snap = read_edm_snapshot(path)
        sde_cfg, model_cfg = edm_config(snap, path)
        u = snap["precond_kwargs"]
        shape = (int(u.get("img_channels", 3)), int(u.get("img_resolution", 32)))
        net = factory.network(model_cfg, (shape[0], shape[1], shape[1]), "images")
        net.load_state_dict(edm_weights(snap["state"], net))
        sde = sde_from_config(sde_cfg)
        model = factory.score_model(model_cfg, net, sde, process=sde_cfg["name"])
        return model.eval(), sde
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
