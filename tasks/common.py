"""Building blocks shared by the three modes: objects from config, checkpoint lookup, user errors.

The config arrives as a plain dict (resolved from Hydra by run.py); nothing here imports Hydra.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from data.cifar10 import cifar10
from data.datasets import (
    DataError,
    Dataset,
    digits,
    folder_dataset,
    mixture_dataset,
    mnist,
    npz_dataset,
    toy,
)
from data.mixtures import mixture5d
from models import MixtureScore, factory, pretrained
from models.diffusers import diffusers_process, diffusers_weights
from models.edm import edm_config, edm_weights, is_pickle, read_edm_snapshot
from sde_lib import SDE, sde_from_config
from sde_lib.errors import UserError
from sde_lib.io import load_weights_only
from sde_lib.vdm import endpoints_from_data
from training import checkpoint as ckpt
from training.distributed import setup, share_from_main

log = logging.getLogger(__name__)

TOY_DATA = ("gmm8", "checkerboard", "swissroll", "moons")
DATA_NAMES = (*TOY_DATA, "mix5d", "digits", "mnist", "npz", "folder", "cifar10")
MODEL_NAMES = ("auto", *factory.NETWORKS, "exact")


def build_sde(c: dict, dataset: Dataset | None = None) -> SDE:
    """The configured SDE. sde=vdm with gamma_min / gamma_max = auto takes its end points from
    the data set (`sde_lib.vdm.endpoints_from_data`; without one, VDM's -13.3 and 5)."""
    if c.get("name") == "vdm" and "auto" in (c.get("gamma_min"), c.get("gamma_max")):
        fitted = (-13.3, 5.0)
        if dataset is not None and dataset.train is not None:
            m2 = float(dataset.train.double().square().mean())
            levels = dataset.levels if dataset.kind == "images" else None
            fitted = endpoints_from_data(levels, dataset.model_range, m2)
        c = {**c}
        for key, value in zip(("gamma_min", "gamma_max"), fitted, strict=True):
            if c.get(key) == "auto":
                c[key] = value
    try:
        return sde_from_config(c)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def build_dataset(c: dict) -> Dataset:
    name = c.get("name")
    try:
        if name in TOY_DATA:
            return toy(name)
        if name == "mix5d":
            return mixture_dataset("mix5d", mixture5d())
        if name == "digits":
            return digits(int(c.get("levels", 17)))
        if name == "mnist":
            return mnist()
        if name == "npz":
            return npz_dataset(
                c["path"],
                c.get("key"),
                c.get("range"),
                c.get("levels"),
                label_key=c.get("label_key"),
            )
        if name == "folder":
            return folder_dataset(c["path"], c.get("channels", 1), image_size=c.get("image_size"))
        if name == "cifar10":
            return cifar10(c["path"], c.get("image_size", 32))
    except DataError as e:
        raise UserError(str(e)) from None
    raise UserError(f"data={name!r} is not known; allowed: {', '.join(DATA_NAMES)}")


def build_network(c: dict, dataset: Dataset) -> torch.nn.Module:
    n_classes = 0
    if c.get("conditional"):
        n_classes = dataset.n_classes
        if n_classes < 2:
            raise UserError(
                f"model.conditional=true needs a labelled data set (digits, mnist, cifar10, gmm8, "
                f"mix5d, npz with data.label_key, folder with class sub-folders); "
                f"data={dataset.name} has no labels"
            )
    return factory.network(c, dataset.shape, dataset.kind, n_classes)


def build_score_model(cfg: dict, sde: SDE, dataset: Dataset) -> torch.nn.Module:
    """A trainable score model (network + parameterisation), or the exact MixtureScore for
    model=exact."""
    c = cfg["model"]
    if c["name"] == "exact":
        if dataset.mixture is None:
            raise UserError(
                f"model=exact needs a data set with a known mixture density "
                f"(data=gmm8 or data=mix5d); got data={dataset.name}"
            )
        return MixtureScore(sde, dataset.mixture)
    torch.manual_seed(int(cfg.get("seed", 0)))
    net = build_network(c, dataset)
    return factory.score_model(c, net, sde, dataset.kind, cfg["sde"]["name"])


def start_processes(cfg: dict):
    """The process group (under torchrun) and this process's device, from cfg['device'] and
    cfg['dist_timeout_s']; a device that is not there is a UserError."""

    try:
        return setup(cfg["device"], timeout_s=float(cfg.get("dist_timeout_s", 600)))
    except ValueError as e:
        raise UserError(str(e)) from None


# data.* keys that change how training reads the data, not what the data are
DATA_RUNTIME_KEYS = ("workers", "random_flip")


def data_identity(c: dict) -> dict:
    """The data config without its loading options (workers, random_flip); data.image_size=null
    (data=folder, no resizing) is the same as absent, as in runs saved before the key existed."""
    c = {k: v for k, v in (c or {}).items() if k not in DATA_RUNTIME_KEYS}
    if c.get("image_size", 0) is None:
        del c["image_size"]
    return c


# keys added to a config group after runs were saved without them, with the value that means
# what those runs did: a missing key and its default are the same run
ADDED_DEFAULTS = {"sde": {"schedule": "linear"}}


def sde_identity(c: dict) -> dict:
    """The sde config with keys added later filled in (sde.schedule=linear for older runs)."""
    c = dict(c or {})
    if c.get("name") in ("vp", "subvp"):
        for k, v in ADDED_DEFAULTS["sde"].items():
            c.setdefault(k, v)
    return c


def model_identity(c: dict) -> dict:
    """The model config, with model.conditional=false the same as absent (older runs)."""
    c = dict(c or {})
    if not c.get("conditional"):
        c.pop("conditional", None)
    return c


def is_classifier_run(cfg: dict) -> bool:
    """A run of training.objective=classifier (a noise-conditional classifier, not a score)."""
    return ((cfg or {}).get("training") or {}).get("objective") == "classifier"


def run_identity(cfg: dict) -> dict:
    """What a checkpoint must share with a run to be used by it: the SDE, data and model."""
    return {
        "sde": sde_identity(cfg["sde"]),
        "data": data_identity(cfg["data"]),
        "model": model_identity(cfg["model"]),
    }


def find_checkpoint(cfg: dict) -> tuple[Path, dict]:
    """The checkpoint to use: ckpt=PATH, else the newest matching run under outputs_root."""
    if cfg.get("ckpt"):
        path = Path(cfg["ckpt"]).expanduser()
        if not path.exists():
            raise UserError(
                f"ckpt={cfg['ckpt']} does not exist; pass the path of a checkpoint file "
                "or leave ckpt unset to use the newest training run"
            )
        return path, read_any_checkpoint(path)
    root = Path(cfg["outputs_root"])
    runs = matching_runs(cfg)
    # runs with this model config first, finished ones first (newest first), then unfinished or
    # failed ones (newest first)
    runs.sort(key=lambda r: (r["model_match"], r["status"] == "finished", r["mtime"]), reverse=True)
    for run in runs:
        for path in reversed(ckpt.list_checkpoints(run["dir"] / "checkpoints")):
            try:
                state = ckpt.load(path)
            except ckpt.CheckpointError as e:
                log.warning(f"{e}; trying an older checkpoint")
                continue
            what = f"newest finished sde={cfg['sde']['name']} data={cfg['data']['name']} run"
            if run["status"] != "finished":
                what = (
                    f"warning: no finished sde={cfg['sde']['name']} data={cfg['data']['name']} "
                    f"run, so the newest {run['status']} one: step {state.get('step')} of "
                    f"{run['planned'] or '?'} planned"
                )
            log.info(f"using checkpoint {path} ({what} under {root})")
            return path, state
    raise UserError(
        f"no checkpoint for sde={cfg['sde']['name']} data={cfg['data']['name']} "
        f"under {root}/train; "
        f"train first (python run.py mode=train sde={cfg['sde']['name']} "
        f"data={cfg['data']['name']}) or pass ckpt=PATH"
    )


def read_any_checkpoint(path: Path) -> dict:
    """A checkpoint in any format read here: a scoresde checkpoint (as `training.checkpoint.load`
    returns it), {"format": "score_sde", "model", "shadow", "step"} for a score_sde_pytorch
    file, {"format": "edm", "snapshot", "step": None} for an EDM network snapshot or
    {"format": "diffusers", "weights", "step": None} for a diffusers folder. Nothing in a file
    is run: torch's weights-only loader, the snapshot reader and safetensors build only
    tensors and plain data."""
    path = Path(path)
    if path.is_dir():
        return {"format": "diffusers", "weights": diffusers_weights(path), "step": None}
    if is_pickle(path):  # EDM's network snapshots are plain pickles (read with no code run)
        return {"format": "edm", "snapshot": read_edm_snapshot(path), "step": None}
    try:
        return ckpt.load(path)
    except ckpt.CheckpointError as e:
        try:
            raw = load_weights_only(path)
        except ValueError:
            raise UserError(str(e)) from None
        if not pretrained.is_score_sde_state(raw):
            raise UserError(
                f"{e} (nor a score_sde_pytorch checkpoint: expected 'model', 'ema' and 'step')"
            ) from None
        return {"format": "score_sde", **pretrained.read_score_sde(path)}


def load_foreign_weights(model: torch.nn.Module, state: dict, path: Path, cfg: dict) -> None:
    """Put a released checkpoint's weights (`read_any_checkpoint` of a score_sde_pytorch file or
    a diffusers folder) into `model`, strictly; its EMA weights unless use_ema=false."""
    if state["format"] == "edm":
        try:
            model.net.load_state_dict(edm_weights(state["snapshot"]["state"], model.net))
        except (pretrained.PretrainedError, AttributeError, RuntimeError) as e:
            raise UserError(
                f"{path}: its weights do not fit the network its configuration describes "
                f"with data={cfg['data']['name']} ({str(e).splitlines()[0]}); check "
                "data.image_size"
            ) from None
        return
    if state["format"] == "diffusers":
        try:
            model.net.unet.load_state_dict(state["weights"])
        except (AttributeError, RuntimeError) as e:
            raise UserError(
                f"{path}: its weights do not fit model={cfg['model']['name']} "
                f"({str(e).splitlines()[0]}); a diffusers folder needs model=diffusers "
                f"model.path={path}"
            ) from None
        return
    try:
        weights = pretrained.score_sde_weights(state, model.net, bool(cfg.get("use_ema", True)))
        model.net.load_state_dict(weights)
    except (pretrained.LayoutMismatch, AttributeError) as e:
        # the presets whose network the file fits, with this run's changes to the network
        shape_keys = ("model.", "data.image_size=", "data.channels=")
        overrides = [o for o in cfg.get("overrides", ()) if o.startswith(shape_keys)]
        fits = pretrained.fitting_presets(state, overrides)
        raise UserError(
            f"checkpoint {path} does not fit model={cfg['model']['name']} as configured: {e}; "
            f"presets whose shapes fit: {', '.join(fits) or 'none'} (+experiment=NAME)"
        ) from None


def matching_runs(cfg: dict) -> list[dict]:
    """Training runs under outputs_root/train (sweep jobs included) with this sde and data:
    dicts of dir, status (finished | interrupted | failed | running | unknown), planned steps
    and the mtime of their newest checkpoint (runs without a checkpoint are left out)."""
    root = Path(cfg["outputs_root"])
    want = {"sde": sde_identity(cfg["sde"]), "data": data_identity(cfg["data"])}
    runs = []
    for run_json in root.glob("train/**/run.json"):
        try:
            meta = json.loads(run_json.read_text())
        except (OSError, ValueError) as e:
            log.warning(f"skipping run {run_json.parent}: unreadable run.json ({e})")
            continue
        if not isinstance(meta, dict) or not isinstance(meta.get("data"), dict):
            continue
        if {"sde": sde_identity(meta.get("sde")), "data": data_identity(meta["data"])} != want:
            continue
        if is_classifier_run(meta) != is_classifier_run(cfg):
            continue
        paths = ckpt.list_checkpoints(run_json.parent / "checkpoints")
        if not paths:
            continue
        try:
            status = json.loads((run_json.parent / "train.json").read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            status = None
        runs.append(
            {
                "dir": run_json.parent,
                "status": status or "unknown",
                "planned": meta.get("planned_steps"),
                "mtime": paths[-1].stat().st_mtime,
                "model_match": model_identity(meta.get("model")) == model_identity(cfg["model"]),
            }
        )
    return runs


def check_compatible(cfg: dict, saved: dict, path: Path) -> None:
    """Refuse a checkpoint whose SDE, data or model config differs from the requested run."""
    mine, theirs = run_identity(cfg), run_identity(saved)
    diffs = []
    for group in mine:
        a, b = mine[group], theirs[group]
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{group}.{key}: run={a.get(key)!r} checkpoint={b.get(key)!r}")
    if diffs:
        raise UserError(
            f"checkpoint {path} does not match this run ({'; '.join(diffs)}); "
            "use the checkpoint's settings or another ckpt"
        )


def checkpoint_from_main(info):
    """A `find_checkpoint` for torchrun: rank 0 finds and loads the checkpoint and its (path,
    contents) reach every rank through the process group, so the ranks of a multi-node run need
    no shared file system nor copies of the file, and all use the same checkpoint (each looking
    under its own outputs_root could pick different runs)."""

    def on_main(cfg: dict) -> tuple[str, dict]:
        path, state = find_checkpoint(cfg)
        return str(path), state  # a str: the weights-only loader that reads it refuses a Path

    def find(cfg: dict) -> tuple[Path, dict]:
        path, state = share_from_main(lambda: on_main(cfg), info, UserError)
        return Path(path), state

    return find


def load_score_model(cfg: dict, find=find_checkpoint):
    """(sde, dataset, score model in eval mode, checkpoint path or None) for sample / nll;
    find(cfg) -> (path, state) supplies the checkpoint (`checkpoint_from_main` under
    torchrun)."""
    dataset = build_dataset(cfg["data"])
    sde = build_sde(cfg["sde"], dataset)
    if cfg["model"]["name"] == "exact":
        return sde, dataset, build_score_model(cfg, sde, dataset).eval(), None
    path, state = find(cfg)
    if state.get("format") in ("diffusers", "edm"):  # the file states its own configuration
        if state["format"] == "edm":
            sde_cfg, model_cfg = edm_config(state["snapshot"], path)
        else:
            sde_cfg, model_cfg = diffusers_process(path)
        if sde_cfg["name"] != cfg["sde"]["name"]:
            raise UserError(
                f"ckpt={path} is a {sde_cfg['name'].upper()} model (its configuration says so); "
                f"pass sde={sde_cfg['name']}"
            )
        log.info(f"using the process {path} states: {sde_cfg}")
        cfg = {**cfg, "sde": sde_cfg, "model": model_cfg}
        sde = build_sde(sde_cfg)
    if state.get("format") in ("diffusers", "score_sde", "edm"):
        model = build_score_model(cfg, sde, dataset)
        load_foreign_weights(model, state, path, cfg)
        step = f" (step {state['step']})" if state.get("step") is not None else ""
        log.info(f"using {state['format']} checkpoint {path}{step}")
        return sde, dataset, model.eval(), path
    saved = ckpt.config_of(state)
    if is_classifier_run(saved):
        raise UserError(
            f"ckpt={path} is a noise-conditional classifier (training.objective=classifier), "
            "not a score model; pass it as sampler.classifier=PATH"
        )
    if cfg.get("ckpt"):  # an explicit checkpoint brings its own model; sde and data must match
        if cfg["model"] != saved["model"]:
            log.info(
                f"using the checkpoint's model config {saved['model']} (ckpt={path}); "
                "model.* overrides are ignored with an explicit ckpt"
            )
        cfg = {**cfg, "model": saved["model"]}
    check_compatible(cfg, saved, path)
    model = build_score_model(saved, sde, dataset)
    load_weights(model, state, path, cfg)
    return sde, dataset, model.eval(), path


def load_weights(model: torch.nn.Module, state: dict, path: Path, cfg: dict) -> None:
    """A checkpoint's weights (`read_any_checkpoint`, any format) into `model`, strictly: its
    EMA weights unless use_ema=false. One line naming the file when they do not fit."""
    if state.get("format") is not None:
        load_foreign_weights(model, state, path, cfg)
        return
    weights = state["ema"] if cfg.get("use_ema", True) else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(
            f"checkpoint {path} does not fit the model: {str(e).splitlines()[0]}; use the "
            "model config it was trained with"
        ) from None
