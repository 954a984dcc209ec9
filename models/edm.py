"""EDM's network snapshots (Karras et al. 2022, `network-snapshot-*.pkl`), read with no code run.

EDM pickles `dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...)` where every network
class is a "persistent class": it unpickles through `torch_utils.persistence.
_reconstruct_persistent_obj(meta)`, and `meta` carries the class's whole source code, which EDM's
own loader executes. Here a restricted `pickle.Unpickler` maps that one global to a plain record
of `meta` (class name, constructor arguments, parameters, buffers, sub-modules) and allows only
torch's tensor rebuilding (storages through the weights-only loader), numpy scalars and plain
containers; any other global ends the read with an error naming it. No module is imported and no
code from the file runs.

The networks are SongUNet (EDM's DDPM++ and NCSN++), which `models.ncsnpp.NCSNpp` reproduces:
EDM's blocks are registered in the same order, its one `qkv` projection is q, k and v (channels
interleaved as c * 3 + j), its [1, 1] resampling filter is nearest / average resampling and
[1, 3, 3, 1] the FIR filter. The preconditioning says how the output becomes a score:
- VPPrecond: D = x - sigma F(x / sqrt(sigma^2 + 1), (M - 1) t(sigma)) in EDM's coordinates
  x = x_t / alpha(t); in the VP SDE's own, score = -F(x_t, (M - 1) t) / std(t), score_sde's
  rule but with EDM's float32 labels (`models.score.EDMVPModel`).
- VEPrecond: D = x + sigma F(x, log(sigma / 2)): score_sde's NCSN++ rule, on [-1, 1] data.
- EDMPrecond: D = c_skip x + c_out F(c_in x, ln(sigma) / 4) (`models.score.EDMPrecondModel`).
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

try:  # numpy 2 moved numpy.core to numpy._core (the old name warns)
    from numpy._core.multiarray import scalar as np_scalar
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core.multiarray import scalar as np_scalar

from .diffusers import PretrainedError

PERSISTENT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
MODULE_CONTAINERS = {"ModuleDict", "ModuleList", "Sequential"}


class Record:
    """What a pickled object held, as plain data: `class_name` and `state` (its __dict__)."""

    def __init__(self, class_name: str = "", state: dict | None = None) -> None:
        self.class_name, self.state = class_name, state or {}

    def __setstate__(self, state) -> None:
        self.state = state if isinstance(state, dict) else {"state": state}


def _persistent(meta) -> Record:
    if not isinstance(meta, dict) or "class_name" not in meta:
        raise pickle.UnpicklingError("a persistent object without a class name")
    return Record(str(meta["class_name"]), meta.get("state") or {})


def _parameter(data, requires_grad=False, *hooks):
    return data  # the tensor itself: hooks and the autograd flag do not matter for reading


def _storage(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)  # refuses any object but storages


class SnapshotUnpickler(pickle.Unpickler):
    ALLOWED = {
        PERSISTENT: _persistent,
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _parameter,
        ("torch.storage", "_load_from_bytes"): _storage,
        ("numpy._core.multiarray", "scalar"): np_scalar,
        ("numpy.core.multiarray", "scalar"): np_scalar,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[module, name]
        if module == "torch.nn.modules.container" and name in MODULE_CONTAINERS:
            return type(name, (Record,), {})  # a plain record of the container's state
        raise pickle.UnpicklingError(f"global {module}.{name}")


def _state_dict(record: Record, prefix: str = "") -> OrderedDict:
    """The parameters and buffers of a recorded module tree, in registration order."""
    out: OrderedDict = OrderedDict()
    state = record.state
    for part in ("_parameters", "_buffers"):
        for name, value in (state.get(part) or {}).items():
            if torch.is_tensor(value):
                out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, Record):
            out.update(_state_dict(child, f"{prefix}{name}."))
    return out


def read_edm_snapshot(path: str | Path) -> dict:
    """{'precond': class name, 'precond_kwargs', 'unet': class name, 'unet_kwargs', 'state':
    the inner network's state dict} of an EDM snapshot; PretrainedError naming the problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = SnapshotUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise PretrainedError(
            f"{path} is not a readable EDM snapshot: it holds {e} (refused: only EDM's network "
            "records, tensors and plain containers are read, nothing in the file is run)"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, RuntimeError, OSError) as e:
        raise PretrainedError(
            f"{path} is not a readable EDM snapshot (truncated or corrupt: {e})"
        ) from None
    net = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(net, Record):
        raise PretrainedError(f"{path} is not an EDM snapshot (no 'ema' network in it)")
    inner = (net.state.get("_modules") or {}).get("model")
    if not isinstance(inner, Record):
        raise PretrainedError(f"{path}: its network {net.class_name} has no inner model")
    return {
        "precond": net.class_name.rsplit(".", 1)[-1],
        "precond_kwargs": dict(net.state.get("_init_kwargs") or {}),
        "unet": inner.class_name.rsplit(".", 1)[-1],
        "unet_kwargs": dict(inner.state.get("_init_kwargs") or {}),
        "state": _state_dict(inner),
    }


def is_pickle(path: Path) -> bool:
    """A plain pickle (protocol 2 or higher), as EDM writes its snapshots."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def edm_config(snap: dict, path: Path) -> tuple[dict, dict]:
    """(sde config, model config) of an EDM snapshot in the toolkit's terms."""
    if snap["unet"] != "SongUNet":
        raise PretrainedError(
            f"{path}: its network is {snap['unet']}; EDM's SongUNet (DDPM++ / NCSN++) is read"
        )
    u, p = snap["unet_kwargs"], snap["precond_kwargs"]
    if u.get("label_dim") or p.get("label_dim"):
        raise PretrainedError(f"{path}: class-conditional EDM networks are not read yet")
    encoder = {"standard": "none", "skip": "input_skip", "residual": "residual"}
    decoder = {"standard": "none", "skip": "output_skip"}
    filt = list(u.get("resample_filter", [1, 1]))
    mult_noise = int(u.get("channel_mult_noise", 1))
    embedding = u.get("embedding_type", "positional")
    if int(u.get("channel_mult_emb", 4)) != 4 or mult_noise != (2 if embedding == "fourier" else 1):
        raise PretrainedError(
            f"{path}: channel_mult_emb={u.get('channel_mult_emb')}, channel_mult_noise="
            f"{mult_noise} with {embedding} embedding: not an NCSN++ / DDPM++ layout"
        )
    model = {
        "name": "ncsnpp",
        "nf": int(u.get("model_channels", 128)),
        "ch_mult": list(u.get("channel_mult", [1, 2, 2, 2])),
        "num_res_blocks": int(u.get("num_blocks", 4)),
        "attn_resolutions": list(u.get("attn_resolutions", [16])),
        "dropout": float(u.get("dropout", 0.1)),
        "resamp_with_conv": True,
        "fir": filt != [1, 1],
        "fir_kernel": filt if filt != [1, 1] else [1, 3, 3, 1],
        "skip_rescale": True,
        "resblock_type": "biggan",
        "progressive": decoder[u.get("decoder_type", "standard")],
        "progressive_input": encoder[u.get("encoder_type", "standard")],
        "progressive_combine": "sum",
        "embedding_type": embedding,
        "fourier_scale": 16.0,
        "init_scale": 0.0,
        "conv_size": 3,
        "norm_groups": None,
        "num_scales": int(p.get("M", 1000)),
    }
    if snap["precond"] == "VPPrecond":
        beta_min, beta_d = float(p.get("beta_min", 0.1)), float(p.get("beta_d", 19.9))
        sde = {"name": "vp", "beta_min": beta_min, "beta_max": beta_min + beta_d}
        return sde, {**model, "parameterisation": "edm_vp"}
    if snap["precond"] == "VEPrecond":
        sde = {"name": "ve", "sigma_min": float(p.get("sigma_min", 0.02))}
        sde["sigma_max"] = float(p.get("sigma_max", 100.0))
        # its noise label log(sigma / 2) is score_sde's NCSN++ on [0, 1] data, in [-1, 1] terms
        model.update(parameterisation="score_sde", continuous=True, centered=False)
        return sde, {**model, "scale_by_sigma": True}
    if snap["precond"] == "EDMPrecond":
        sde = {"name": "ve", "sigma_min": float(p.get("sigma_min", 0.002))}
        sde["sigma_max"] = float(p.get("sigma_max", 80.0))
        model.update(parameterisation="edm", sigma_data=float(p.get("sigma_data", 0.5)))
        return sde, model
    raise PretrainedError(
        f"{path}: preconditioning {snap['precond']} is not read; allowed: VPPrecond, VEPrecond, "
        "EDMPrecond"
    )


def _as_ours(key: str, value: torch.Tensor) -> list[torch.Tensor]:
    """EDM's tensors in NCSNpp's order: one qkv projection is q, k, v (channels c * 3 + j)."""
    if key.endswith(".qkv.weight") or key.endswith(".qkv.bias"):
        return [value[j::3] for j in range(3)]
    return [value]


def edm_weights(state: dict, net: torch.nn.Module) -> dict:
    """The state dict of `net` (an NCSNpp built from `edm_config`) holding a snapshot's weights.
    Resampling filters (buffers fixed by the configuration) and the augmentation-label map (zero
    labels at sampling time) carry no weights of the network."""
    theirs = []
    for key, value in state.items():
        if key.endswith("resample_filter") or key.startswith("map_augment."):
            continue
        if key.endswith(".weight") and ".qkv." in key:
            q, k, v = _as_ours(key, value)
            bias = state[key[: -len("weight")] + "bias"]
            qb, kb, vb = _as_ours(key[: -len("weight")] + "bias", bias)
            theirs += [(key, q), (key, qb), (key, k), (key, kb), (key, v), (key, vb)]
            continue
        if key.endswith(".qkv.bias"):
            continue
        theirs.append((key, value))
    mine = list(net.state_dict().items())
    if len(theirs) != len(mine):
        raise PretrainedError(
            f"the snapshot holds {len(theirs)} tensors where the network built from its "
            f"configuration has {len(mine)}"
        )
    out = {}
    for (tk, tv), (mk, mv) in zip(theirs, mine):
        if tv.shape != mv.shape:
            raise PretrainedError(f"its {tk} {tuple(tv.shape)} does not fit {mk} {tuple(mv.shape)}")
        out[mk] = tv.to(mv.dtype)
    return out
