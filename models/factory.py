"""Networks and score wrappers from a run's `model` config (a plain dict; nothing here reads Hydra).

`network(c, shape, kind, n_classes)` builds the architecture `c["name"]` names for data of `shape`
("points" or "images"); `score_model(c, net, sde)` wraps it into the score of `sde` under the
config's parameterisation. Both raise UserError with the key, the value and what is allowed.
"""

from __future__ import annotations

from torch import nn

from sde_lib import SDE
from sde_lib.errors import UserError

from .diffusers import diffusers_network
from .mlp import MLP
from .ncsnpp import NCSNpp
from .score import EDMPrecondModel, EDMVPModel, ScoreModel, ScoreSDEModel
from .unet import UNet

NETWORKS = ("mlp", "unet", "ncsnpp", "ddpm", "diffusers")
PARAMETERISATIONS = ("eps", "score", "x0", "v", "flow", "score_sde", "edm", "edm_vp")

# the keyword arguments of NCSNpp that a model config may set (score_sde's names)
NCSNPP_KEYS = (
    "nf",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
    "resamp_with_conv",
    "fir",
    "fir_kernel",
    "skip_rescale",
    "resblock_type",
    "progressive",
    "progressive_input",
    "progressive_combine",
    "embedding_type",
    "fourier_scale",
    "init_scale",
    "conv_size",
    "norm_groups",
)


def _unet_defaults(shape: tuple[int, ...]) -> dict:
    res = shape[-1]
    ch_mult = [1, 2] if res <= 8 else [1, 2, 2] if res <= 28 else [1, 2, 2, 2]
    while res % 2 ** (len(ch_mult) - 1):
        ch_mult.pop()
    lowest = res // 2 ** (len(ch_mult) - 1)
    return {"ch_mult": ch_mult, "attn_resolutions": [lowest]}


def network(c: dict, shape: tuple[int, ...], kind: str, n_classes: int = 0) -> nn.Module:
    """The architecture of model config `c` for data of `shape` (kind "points" | "images")."""
    name = c["name"]
    if name == "auto":
        name = "mlp" if kind == "points" else "unet"
    emb = c.get("embedding", "sinusoidal")
    if name == "mlp":
        return MLP(
            shape,
            hidden=int(c.get("hidden", 256)),
            depth=int(c.get("depth", 4)),
            emb_dim=int(c.get("emb_dim", 64)),
            embedding=emb,
            n_classes=n_classes,
        )
    if name not in NETWORKS:
        raise UserError(f"model={name!r} is not known; allowed: auto, {', '.join(NETWORKS)}, exact")
    if len(shape) != 3:
        raise UserError(
            f"model={name} needs images (C, H, W); the data have shape {tuple(shape)}; "
            "use model=mlp"
        )
    if name == "diffusers":  # diffusers' own UNet2DModel, built from the folder's config
        if n_classes:
            raise UserError("model=diffusers: class-conditional diffusers UNets are not read")
        return diffusers_network(c["path"], weights=False)
    if name == "unet":
        auto = _unet_defaults(shape)
        return UNet(
            shape,
            ch=int(c.get("ch", 32)),
            ch_mult=c.get("ch_mult") or auto["ch_mult"],
            num_res_blocks=int(c.get("num_res_blocks", 1)),
            attn_resolutions=c.get("attn_resolutions") or auto["attn_resolutions"],
            dropout=float(c.get("dropout", 0.0)),
            embedding=emb,
            n_classes=n_classes,
        )
    kwargs = {k: c[k] for k in NCSNPP_KEYS if c.get(k) is not None}
    for k in ("ch_mult", "attn_resolutions", "fir_kernel"):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    try:
        return NCSNpp(shape, n_classes=n_classes, **kwargs)
    except ValueError as e:
        raise UserError(f"model={name}: {e}") from None


def score_model(
    c: dict, net: nn.Module, sde: SDE, kind: str = "images", process: str = "vp"
) -> nn.Module:
    """The score of `sde` from `net` under c["parameterisation"]:
    eps / score / x0 / v / flow: the toolkit's own (input scaled by c_in, the network sees t),
    see ScoreModel;
    score_sde: the conventions score_sde's networks were trained with for `process` (the sde
    config's name), see ScoreSDEModel; edm: EDM's preconditioning, see EDMPrecondModel;
    edm_vp: EDM's VP preconditioning, see EDMVPModel."""
    param = c.get("parameterisation", "eps")
    if param not in PARAMETERISATIONS:
        allowed = ", ".join(PARAMETERISATIONS)
        raise UserError(f"model.parameterisation={param!r} is not known; allowed: {allowed}")
    if param == "score_sde":
        try:
            return ScoreSDEModel(
                net,
                sde,
                process,
                continuous=bool(c.get("continuous", True)),
                n_levels=int(c.get("num_scales", 1000)),
                centered=bool(c.get("centered", True)),
                scale_by_sigma=bool(c.get("scale_by_sigma", False)),
            )
        except ValueError as e:
            raise UserError(f"model.parameterisation=score_sde: {e}") from None
    sigma_data = c.get("sigma_data")
    if sigma_data is None:
        sigma_data = 1.0 if kind == "points" else 0.5
    if param == "edm_vp":
        if process != "vp":
            raise UserError(
                f"model.parameterisation=edm_vp is EDM's VP model: use sde=vp, not {process}"
            )
        return EDMVPModel(net, sde, int(c.get("num_scales", 1000)))
    if param == "edm":  # Fourier embeddings take the log of their input: give exp(c_noise)
        label = "exp" if c.get("embedding_type") == "fourier" else "c_noise"
        return EDMPrecondModel(net, sde, float(sigma_data), label)
    return ScoreModel(net, sde, param, float(sigma_data))
