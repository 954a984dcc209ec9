"""Check every numeric and choice field of a run's config before any work starts.

Each failure is a UserError whose one line names the key, the value and what is allowed. The
allowed values are read from the modules that own them (samplers.RULES, the SDE constructors,
likelihood's solver tables); what is stated here is the run's own keys.
"""

from __future__ import annotations

from pathlib import Path

import torch

import samplers
from likelihood.dequantization import DEQUANTIZATIONS
from likelihood.divergence import PROBES
from likelihood.ode import BACKENDS, DIVERGENCES, PERPOINT_METHODS
from models import factory
from models.ncsnpp import COMBINE, EMBEDDINGS, PROGRESSIVE, PROGRESSIVE_INPUT, RESBLOCKS
from models.score import ScoreSDEModel
from samplers.fast import entry, is_table
from samplers.optimise_grid import check_fittable
from sde_lib import SDE_CLASSES
from sde_lib.errors import UserError
from sde_lib.options import Choice, Number
from training.losses import NOISE_DISTRIBUTIONS, WEIGHTINGS, TimeSampler

from .common import DATA_NAMES, MODEL_NAMES, build_sde
from .inverse import ALL_METHODS
from .nll import DTYPES, METHODS, SOLVERS
from .sample import sampler_call_options

MODES = ("train", "sample", "nll", "eval")
LOSSES = ("auto", "dsm", "ssm", "ddpm", "smld", "vlb", "nll")


def _get(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _num(
    cfg: dict,
    key: str,
    *,
    kind=float,
    lo=None,
    hi=None,
    lo_open=False,
    hi_open=False,
    none_ok=False,
):
    """cfg[key] (a dotted path) as a finite number of `kind` within the bounds, else UserError."""
    rule = Number(lo, hi, kind is int, lo_open, hi_open, none_ok)
    return rule.check(key, _get(cfg, key))


def _choice(cfg: dict, key: str, allowed) -> str:
    return Choice(*allowed).check(key, _get(cfg, key))


def validate_sde(cfg: dict) -> None:
    """Each parameter a finite number; the SDE's constructor owns the rest (order, schedules)."""
    _choice(cfg, "sde.name", tuple(SDE_CLASSES))
    for key, value in cfg["sde"].items():
        if key != "name" and not isinstance(value, (str, bool)):
            _num(cfg, f"sde.{key}")
    if "learn_endpoints" in cfg["sde"]:
        _choice(cfg, "sde.learn_endpoints", (True, False))
    build_sde(cfg["sde"])  # UserError naming the SDE and what its constructor refused


def validate_common(cfg: dict) -> None:
    _choice(cfg, "mode", MODES)
    _choice(cfg, "device", ("auto", "cpu", "cuda"))
    _num(cfg, "seed", kind=int, lo=0)
    validate_sde(cfg)
    _choice(cfg, "data.name", DATA_NAMES)
    if cfg["data"]["name"] == "digits":
        _choice(cfg, "data.levels", (17, 256))
    if cfg["data"]["name"] in ("cifar10", "folder"):  # folder: null keeps the images' own size
        _num(cfg, "data.image_size", kind=int, lo=1, none_ok=cfg["data"]["name"] == "folder")
    _choice(cfg, "model.name", MODEL_NAMES)
    _choice(cfg, "logger.mode", ("offline", "online", "disabled"))
    if cfg["model"]["name"] != "exact":
        _choice(cfg, "model.parameterisation", factory.PARAMETERISATIONS)
        _num(cfg, "model.sigma_data", lo=0, lo_open=True, none_ok=True)
    if cfg["model"]["name"] in ("auto", "mlp", "unet"):
        _choice(cfg, "model.embedding", ("sinusoidal", "fourier"))
    if cfg["model"]["name"] in ("ncsnpp", "ddpm"):
        validate_ncsnpp(cfg)
    if cfg["model"].get("parameterisation") == "score_sde":
        validate_score_sde_convention(cfg)
    if cfg["model"]["name"] == "mlp":
        for k in ("hidden", "depth", "emb_dim"):
            _num(cfg, f"model.{k}", kind=int, lo=1)
    if cfg["model"]["name"] == "unet":
        _num(cfg, "model.ch", kind=int, lo=1)
        _num(cfg, "model.num_res_blocks", kind=int, lo=1)
        _num(cfg, "model.dropout", lo=0, hi=0.99)


def _int_list(cfg: dict, key: str, lo: int, empty_ok: bool = False) -> None:
    value = _get(cfg, key)
    ok = isinstance(value, list) and (empty_ok or value)
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= lo for v in value):
        raise UserError(
            f"{key}={value!r} is not allowed; give a list of integers >= {lo}, e.g. {key}=[1,2,2]"
        )


def validate_ncsnpp(cfg: dict) -> None:
    """model=ncsnpp|ddpm: score_sde's knobs (models.ncsnpp.NCSNpp checks their combination)."""
    m = "model"
    _num(cfg, f"{m}.nf", kind=int, lo=1)
    _int_list(cfg, f"{m}.ch_mult", 1)
    _num(cfg, f"{m}.num_res_blocks", kind=int, lo=1)
    _int_list(cfg, f"{m}.attn_resolutions", 1, empty_ok=True)
    _num(cfg, f"{m}.dropout", lo=0, hi=1, hi_open=True)
    for k in ("resamp_with_conv", "fir", "skip_rescale"):
        _choice(cfg, f"{m}.{k}", (True, False))
    _int_list(cfg, f"{m}.fir_kernel", 1)
    _choice(cfg, f"{m}.resblock_type", RESBLOCKS)
    _choice(cfg, f"{m}.progressive", PROGRESSIVE)
    _choice(cfg, f"{m}.progressive_input", PROGRESSIVE_INPUT)
    _choice(cfg, f"{m}.progressive_combine", COMBINE)
    _choice(cfg, f"{m}.embedding_type", EMBEDDINGS)
    _num(cfg, f"{m}.fourier_scale", lo=0, lo_open=True)
    _num(cfg, f"{m}.init_scale", lo=0)
    if _num(cfg, f"{m}.conv_size", kind=int, lo=1) % 2 != 1:
        raise UserError(f"model.conv_size={cfg[m]['conv_size']} must be odd (3 in every paper)")
    _num(cfg, f"{m}.norm_groups", kind=int, lo=1, none_ok=True)


def validate_score_sde_convention(cfg: dict) -> None:
    """model.parameterisation=score_sde: the SDE and the convention's flags fit together."""
    m = "model"
    for k in ("continuous", "centered", "scale_by_sigma"):
        _choice(cfg, f"{m}.{k}", (True, False))
    _num(cfg, f"{m}.num_scales", kind=int, lo=2)
    c = cfg[m]
    try:
        ScoreSDEModel(
            torch.nn.Identity(),
            build_sde(cfg["sde"]),
            cfg["sde"]["name"],
            continuous=c["continuous"],
            centered=c["centered"],
        )
    except ValueError as e:
        sde = cfg["sde"]["name"]
        raise UserError(f"model.parameterisation=score_sde with sde={sde}: {e}") from None


def validate_training(cfg: dict) -> None:
    if cfg["model"]["name"] == "exact":
        raise UserError(
            "model=exact is a closed-form score with nothing to train; "
            "use mode=sample or mode=nll with it, or pick model=mlp/unet to train"
        )
    t = "training"
    _num(cfg, f"{t}.steps", kind=int, lo=1, none_ok=True)
    _num(cfg, "data.train_steps", kind=int, lo=1)
    _num(cfg, f"{t}.batch_size", kind=int, lo=1, none_ok=True)
    _num(cfg, f"{t}.lr", lo=0, lo_open=True, none_ok=True)
    _num(cfg, f"{t}.warmup", kind=int, lo=0)
    _num(cfg, f"{t}.grad_clip", lo=0, lo_open=True)
    _num(cfg, f"{t}.ema_decay", lo=0, hi=0.999999)
    _num(cfg, f"{t}.weight_decay", lo=0)
    _choice(cfg, f"{t}.loss", LOSSES)
    _choice(cfg, f"{t}.objective", ("score", "classifier"))
    _num(cfg, f"{t}.label_dropout", lo=0, hi=1, hi_open=True)
    _choice(cfg, "model.conditional", (True, False))
    if cfg[t]["objective"] == "classifier" and cfg["model"]["conditional"]:
        raise UserError(
            "training.objective=classifier trains a classifier p_t(y | x), which "
            "is not class-conditional: drop model.conditional=true"
        )
    _choice(cfg, f"{t}.likelihood_weighting", (True, False))
    if "noise" in cfg[t]:
        noise = _choice(cfg, f"{t}.noise", NOISE_DISTRIBUTIONS)
        _num(cfg, f"{t}.p_mean")
        _num(cfg, f"{t}.p_std", lo=0, lo_open=True)
        _choice(cfg, f"{t}.importance_weights", (True, False))
        weighting = cfg[t].get("weighting")
        if weighting is not None:
            _choice(cfg, f"{t}.weighting", WEIGHTINGS)
        if (noise != "uniform_t" or weighting) and cfg[t]["loss"] not in ("auto", "dsm"):
            raise UserError(
                f"training.noise={noise} / training.weighting={weighting} apply to the "
                f"continuous DSM loss, not training.loss={cfg[t]['loss']}; use training.loss=dsm"
            )
        if (noise != "uniform_t" or weighting) and cfg["sde"]["name"] == "vdm":
            raise UserError(
                f"training.noise={noise} / training.weighting={weighting} need a fixed noise "
                "schedule; sde=vdm learns its own with its bound: leave them at their defaults"
            )
    if _choice(cfg, f"{t}.reduce_mean", (True, False)) and cfg[t]["loss"] == "vlb":
        raise UserError(
            "training.reduce_mean=true averages a score-matching loss over dimensions; "
            "the bound of training.loss=vlb is a sum: drop reduce_mean"
        )
    if cfg[t].get("init_from") is not None and not Path(str(cfg[t]["init_from"])).exists():
        raise UserError(
            f"training.init_from={cfg[t]['init_from']} does not exist; pass a checkpoint file "
            "(scoresde or score_sde_pytorch) or a diffusers folder"
        )
    if cfg[t]["loss"] == "nll":
        _num(cfg, f"{t}.nll_tol", lo=0, lo_open=True, hi=1)
    _num(cfg, f"{t}.n_projections", kind=int, lo=1)
    _choice(cfg, f"{t}.projection", ("rademacher", "gaussian"))
    _num(cfg, f"{t}.n_levels", kind=int, lo=2)
    _num(cfg, f"{t}.eps", lo=0, lo_open=True, hi=0.5)
    if cfg[t].get("noise", "uniform_t") != "uniform_t":
        _noise_fits_sde(cfg, cfg[t]["noise"])
    for k in ("log_every", "ckpt_every", "keep", "max_bad_steps"):
        _num(cfg, f"{t}.{k}", kind=int, lo=1)
    _num(cfg, f"{t}.batch_per_device", kind=int, lo=1, none_ok=True)
    _choice(cfg, f"{t}.precision", ("fp32", "bf16"))
    for k in ("tf32", "compile"):
        _choice(cfg, f"{t}.{k}", (True, False))
    _choice(cfg, "data.random_flip", (True, False))
    _num(cfg, "data.workers", kind=int, lo=0)


def _validate_sample_logp(cfg: dict) -> None:
    """sampler.logp=true: the per-point PF ODE with the divergence alongside."""
    c = cfg["sampler"]
    _choice(cfg, "sampler.divergence", ("auto", *DIVERGENCES))
    if not _choice(cfg, "sampler.logp", (True, False)):
        return
    if c["name"] != "ode" or c.get("method") not in PERPOINT_METHODS or c.get("per_point") is False:
        raise UserError(
            "sampler.logp=true integrates the density along the per-point PF ODE: use "
            f"sampler=ode with sampler.method in {', '.join(PERPOINT_METHODS)}"
        )
    if c.get("denoise"):
        raise UserError(
            "sampler.logp=true gives the density of x_eps, which Tweedie's denoising would move: "
            "set sampler.denoise=false"
        )
    if c.get("task", "sample") != "sample":
        raise UserError(f"sampler.logp=true works with sampler.task=sample, not {c['task']}")


MIN_EFFECTIVE_SHARE = 0.01


def _noise_fits_sde(cfg: dict, noise: str) -> None:
    """A proposal must put mass on the SDE's noise range and, with importance weights, leave a
    usable share of each batch effective (below 1 %, one example's weight swamps the rest)."""
    t = cfg["training"]
    weights = bool(t["importance_weights"])
    sampler = TimeSampler(build_sde(cfg["sde"]), float(t["eps"]), noise, t["p_mean"], t["p_std"])
    try:
        share = sampler.fit(weights)
    except ValueError as e:
        raise UserError(f"training.noise={noise}: {e}; move training.p_mean into it") from None
    if share < MIN_EFFECTIVE_SHARE:
        raise UserError(
            f"training.noise={noise} (p_mean={t['p_mean']}, p_std={t['p_std']}) fits "
            f"sde={cfg['sde']['name']} badly: its importance weights leave {share:.2%} of a batch "
            "effective; set training.importance_weights=false (the proposal's own objective, as "
            "EDM) or widen training.p_std"
        )


def validate_sampler(cfg: dict) -> None:
    """The sampler group: a known name that applies to the SDE, then each option by the rule its
    sampler module states (samplers.RULES), then the run's own keys (RUN_KEYS) and the grid."""
    name = _choice(cfg, "sampler.name", tuple(samplers.SAMPLERS))
    sde = build_sde(cfg["sde"])
    try:
        samplers.check_applicable(name, sde)
    except ValueError as e:
        raise UserError(f"sampler={name} with sde={cfg['sde']['name']}: {e}") from None
    samplers.check_options(name, sampler_call_options(cfg["sampler"]), prefix="sampler.")
    c = cfg["sampler"]
    if c.get("path") is not None:
        _choice(cfg, "sampler.path", ("vp", "subvp", "ve", "rectified", "trig"))
        if c.get("task", "sample") != "sample" or c.get("class_label") is not None:
            raise UserError(
                "sampler.path moves an unconditional model to another path; it works with "
                "sampler.task=sample and no class_label"
            )
        if cfg["sde"]["name"] == "vdm":
            raise UserError(
                "sampler.path needs a model of a fixed path; sde=vdm learns its own schedule"
            )
    if name == "edm" and c.get("S_tmax") is not None and c["S_tmax"] < c["S_tmin"]:
        raise UserError(
            f"sampler.S_tmax={c['S_tmax']} is below sampler.S_tmin={c['S_tmin']}; churn acts on "
            "noise levels in [S_tmin, S_tmax]"
        )
    if c.get("logp") is not None:
        _validate_sample_logp(cfg)
    p = "sampler"
    _num(cfg, f"{p}.steps", kind=int, lo=1, none_ok=True)
    _num(cfg, f"{p}.eps", lo=0, lo_open=True, hi=0.5)
    _choice(cfg, f"{p}.denoise", (True, False))
    _num(cfg, f"{p}.n_samples", kind=int, lo=1)
    _num(cfg, f"{p}.batch_size", kind=int, lo=1)
    c = cfg["sampler"]
    if c.get("grid") == "fit":  # fitted to the model when sampling (tasks.sample.fit_grid)
        if c.get("task", "sample") != "sample":
            raise UserError(
                f"sampler.grid=fit works with sampler.task=sample only, not "
                f"{c['task']}; fit with task=sample, then pass the schedule.json it "
                "writes as sampler.grid"
            )
        try:
            check_fittable(name, c, c.get("steps") or samplers.sampler_options(name).get("steps"))
        except ValueError as e:
            raise UserError(f"sampler.grid=fit is not allowed for sampler={name}: {e}") from None
    elif c.get("grid") not in (None, "auto"):  # auto: decided when sampling (auto_grid)
        # a grid name or a .json schedule file (checked against steps, eps and T)
        steps = c.get("steps") or samplers.sampler_options(name).get("steps")
        if steps is None:  # adaptive ODE solvers: a grid only matters for a fixed step count
            if c["grid"] not in samplers.GRIDS and not Path(str(c["grid"])).is_file():
                raise UserError(
                    f"sampler.grid={c['grid']!r} is not allowed; allowed: "
                    f"{', '.join(samplers.GRIDS)}, or a .json schedule file"
                )
        else:
            try:
                if name == "fast" and is_table(c["grid"]):  # a refitted table of fast's defaults
                    entry(sde, int(steps), c["grid"])
                else:
                    samplers.get_grid(c["grid"], sde, int(steps), float(c["eps"]))
            except (ValueError, OSError) as e:
                raise UserError(f"sampler.grid={c['grid']!r}: {e}") from None
    validate_conditional_sampling(cfg)


def validate_conditional_sampling(cfg: dict) -> None:
    """sampler.task, mask, class_label, guidance, classifier, classifier_scale (their fit to the
    model and data is checked once those are loaded, in tasks/conditional.py and control.py)."""
    p, c = "sampler", cfg["sampler"]
    if "task" in c:
        _choice(cfg, f"{p}.task", ("sample", "inpaint", "colorize", "inverse"))
    if c.get("task") == "inverse":
        validate_inverse(cfg)
    mask = c.get("mask", "left")
    if not isinstance(mask, str) or not mask:
        raise UserError(
            f"sampler.mask={mask!r} is not allowed; allowed: left, right, top, "
            "bottom, center, random or the path of a .npy file"
        )
    label = c.get("class_label")
    ok = (
        label is None
        or label == "random"
        or (isinstance(label, int) and not isinstance(label, bool) and label >= 0)
        or (
            isinstance(label, list)
            and label
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in label)
        )
    )
    if not ok:
        raise UserError(
            f"sampler.class_label={label!r} is not allowed; allowed: a class "
            "index K >= 0, a list of them (one per sample), random or null"
        )
    for key in ("guidance", "classifier_scale"):
        if key in c:
            _num(cfg, f"{p}.{key}", lo=0)
    if c.get("classifier") is not None and not isinstance(c["classifier"], str):
        raise UserError(
            f"sampler.classifier={c['classifier']!r} is not allowed; allowed: the "
            "path of a classifier checkpoint, exact or null"
        )


def validate_inverse(cfg: dict) -> None:
    """The keys of sampler.task=inverse (the operator's fit to the data is checked once the data
    set is loaded, in tasks/inverse.py)."""
    p, c = "sampler", cfg["sampler"]
    _choice(cfg, f"{p}.inverse_method", ALL_METHODS)
    if not isinstance(c.get("operator"), str) or not c["operator"]:
        raise UserError(
            f"sampler.operator={c.get('operator')!r} is not allowed; allowed: mask, blur, "
            "downsample, colorize, identity or the path of an (m, n) .npy matrix"
        )
    _num(cfg, f"{p}.sigma_y", lo=0)
    _num(cfg, f"{p}.blur_std", lo=0, lo_open=True)
    _num(cfg, f"{p}.factor", kind=int, lo=2)
    _num(cfg, f"{p}.inverse_steps", kind=int, lo=1, none_ok=True)
    _num(cfg, f"{p}.dps_scale", lo=0)
    _num(cfg, f"{p}.particles", kind=int, lo=1)
    _num(cfg, f"{p}.draws", kind=int, lo=1)


def validate_likelihood(cfg: dict) -> None:
    """The likelihood group: method, divergence, probes, solver of the backend, tolerances."""
    p = "likelihood"
    if not isinstance(cfg.get(p), dict):
        raise UserError(f"likelihood={cfg.get(p)!r} is not a config group; use likelihood=ode")
    _choice(cfg, f"{p}.method", METHODS)
    _choice(cfg, f"{p}.divergence", ("auto", *DIVERGENCES))
    _choice(cfg, f"{p}.probe", PROBES)
    _num(cfg, f"{p}.n_probes", kind=int, lo=1)
    backend = _choice(cfg, f"{p}.backend", BACKENDS)
    solver = cfg[p].get("solver")
    if solver not in SOLVERS[backend]:
        raise UserError(
            f"likelihood.solver={solver!r} is not an adaptive solver of "
            f"likelihood.backend={backend}; allowed: {', '.join(SOLVERS[backend])}"
        )
    _num(cfg, f"{p}.rtol", lo=0, lo_open=True)
    _num(cfg, f"{p}.atol", lo=0, lo_open=True)
    _num(cfg, f"{p}.eps", lo=0, lo_open=True, hi=1.0, hi_open=True)
    _num(cfg, f"{p}.n_points", kind=int, lo=1, none_ok=True)
    _num(cfg, f"{p}.batch_size", kind=int, lo=1)
    _num(cfg, f"{p}.dequant_draws", kind=int, lo=1)
    if "dequantization" in cfg[p]:
        _choice(cfg, f"{p}.dequantization", DEQUANTIZATIONS)
        _num(cfg, f"{p}.importance_samples", kind=int, lo=1)
    _num(cfg, f"{p}.elbo_samples", kind=int, lo=2)  # its standard error needs two samples
    if cfg[p]["method"] == "vlb":
        _num(cfg, f"{p}.vlb_samples", kind=int, lo=2)
        _num(cfg, f"{p}.steps", kind=int, lo=1, none_ok=True)
        _choice(cfg, f"{p}.vlb_time", ("auto", "time", "log_snr"))
    _choice(cfg, f"{p}.dtype", tuple(DTYPES))
    if cfg[p].get("threads") != "auto":
        _num(cfg, f"{p}.threads", kind=int, lo=1)


def validate(cfg: dict) -> None:
    """Check the whole config for the requested mode; raise UserError on the first bad field."""
    validate_common(cfg)
    validate_sampler(cfg)
    validate_likelihood(cfg)
    mode = cfg["mode"]
    if mode == "train":
        validate_training(cfg)
