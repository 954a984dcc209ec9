"""Conditional generation in mode=sample: class labels, classifier-free and classifier guidance
(sampler.class_label, sampler.guidance, sampler.classifier, sampler.classifier_scale) and the
share of samples of the requested class (metrics.json `conditional_accuracy`).

The guided score is `samplers.guidance.GuidedScore`, one wrapper around the score model, so
every sampler works with it unchanged. Labels are per sample and keyed by global sample index
(class_label=random draws them from (seed, index)), like the sampling noise itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from metrics.classifier import load_or_train, to_input
from metrics.images import dataset_uint8
from models import MixtureClassifier
from models.classifier import ImageClassifierNet, NoisyClassifier, PointClassifierNet
from samplers.guidance import GuidedScore, label_batch
from training import checkpoint as ckpt

from .common import UserError, data_identity, is_classifier_run

log = logging.getLogger(__name__)

GUIDANCE_KEYS = ("class_label", "guidance", "classifier", "classifier_scale")


def n_classes_of(model) -> int:
    return int(getattr(model, "n_classes", 0) or 0)


def build_classifier(cfg: dict, sde, dataset) -> torch.nn.Module:
    """The noise-conditional classifier of training.objective=classifier for this data set:
    widths from the model group (model.ch for images, model.hidden for points)."""

    k = dataset.n_classes
    if k < 2:
        raise UserError(
            f"training.objective=classifier needs a labelled data set (digits, mnist, cifar10, "
            f"gmm8, mix5d, npz with data.label_key, folder with class sub-folders); "
            f"data={dataset.name} has no labels"
        )
    c = cfg["model"]
    torch.manual_seed(int(cfg.get("seed", 0)))
    emb = c.get("embedding", "sinusoidal")
    if dataset.kind == "images":
        net = ImageClassifierNet(dataset.shape, k, ch=int(c.get("ch", 32)), embedding=emb)
        sigma_data = 0.5
    else:
        net = PointClassifierNet(
            dataset.shape,
            k,
            hidden=int(c.get("hidden", 128)),
            depth=int(c.get("depth", 3)),
            embedding=emb,
        )
        sigma_data = 1.0
    if c.get("sigma_data") is not None:
        sigma_data = float(c["sigma_data"])
    return NoisyClassifier(net, sde, k, sigma_data)


def load_classifier(cfg: dict, sde, dataset) -> torch.nn.Module:
    """sampler.classifier: 'exact' (the closed-form p_t(y | x) of a mixture data set) or the path
    of a training.objective=classifier checkpoint with the same sde and data."""
    spec = cfg["sampler"]["classifier"]
    if spec == "exact":
        if dataset.mixture is None:
            raise UserError(
                f"sampler.classifier=exact needs a mixture data set (gmm8, mix5d); "
                f"data={dataset.name} has no closed-form classifier"
            )
        return MixtureClassifier(sde, dataset.mixture)
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise UserError(
            f"sampler.classifier={spec}: no such file; pass a checkpoint of "
            "mode=train training.objective=classifier, or exact"
        )
    try:
        state = ckpt.load(path)  # weights_only: the file cannot run code
    except ckpt.CheckpointError as e:
        raise UserError(str(e)) from None
    saved = ckpt.config_of(state)
    if not is_classifier_run(saved):
        raise UserError(
            f"sampler.classifier={spec} is a score checkpoint, not a classifier "
            "(train one with training.objective=classifier)"
        )
    for group, mine, theirs in (
        ("sde", cfg["sde"], saved["sde"]),
        ("data", data_identity(cfg["data"]), data_identity(saved["data"])),
    ):
        if mine != theirs:
            raise UserError(
                f"sampler.classifier={spec} was trained with {group}={theirs}, "
                f"this run has {group}={mine}"
            )
    model = build_classifier(saved, sde, dataset)
    try:
        model.load_state_dict(state["ema"])
    except RuntimeError as e:
        raise UserError(
            f"sampler.classifier={spec} does not fit: {str(e).splitlines()[0]}"
        ) from None
    log.info(f"classifier guidance with {path} (scale {cfg['sampler']['classifier_scale']})")
    return model.eval()


def make_guide(cfg: dict, model, dataset, sde, device):
    """(guide, description): guide(indices) -> the score_fn of those samples (None: the plain
    model), checked against the model and the data (bad input is a UserError)."""
    c = cfg["sampler"]
    spec = c.get("class_label")
    w = float(c.get("guidance") or 0.0)
    clf = c.get("classifier")
    k_model = n_classes_of(model)
    if w != 0 and k_model == 0:
        raise UserError(
            f"sampler.guidance={w:g} needs a conditional model (train it with "
            "model.conditional=true); this model is unconditional"
        )
    if spec is None:
        if w != 0 or clf:
            what = f"sampler.guidance={w:g}" if w != 0 else f"sampler.classifier={clf}"
            raise UserError(f"{what} needs sampler.class_label=K (a class, a list, or random)")
        return None, {}
    if clf and w != 0:
        raise UserError(
            "sampler.guidance (classifier-free) and sampler.classifier (classifier "
            "guidance) are two methods: set one of them"
        )
    classifier = None
    if clf:
        classifier = load_classifier(cfg, sde, dataset).to(device)
        k = classifier.n_classes
    elif k_model == 0:
        raise UserError(
            "sampler.class_label needs a conditional model (train it with "
            "model.conditional=true) or a classifier (sampler.classifier=PATH)"
        )
    else:
        k = k_model
    n = int(c["n_samples"])
    values = spec if isinstance(spec, (list, tuple)) else [] if spec == "random" else [spec]
    if isinstance(spec, (list, tuple)) and len(spec) != n:
        raise UserError(
            f"sampler.class_label is a list of {len(spec)} labels; give one per "
            f"sample (sampler.n_samples={n}), a single class or random"
        )
    for v in values:
        if not 0 <= int(v) < k:
            raise UserError(
                f"sampler.class_label={v} is out of range: the model has {k} classes, 0..{k - 1}"
            )
    seed = int(cfg["seed"])
    scale = float(c.get("classifier_scale", 1.0))

    def guide(indices: torch.Tensor):
        y = label_batch(spec, indices, k, seed).to(device)
        return GuidedScore(model, y, guidance=w, classifier=classifier, classifier_scale=scale)

    method = "classifier" if clf else "classifier-free" if w != 0 else "conditional"
    desc = {"class_label": spec, "guidance": w, "guidance_method": method, "n_classes": k}
    if clf:
        desc.update(classifier=str(clf), classifier_scale=scale)
    if method == "classifier-free":
        desc["nfe_note"] = (
            "one NFE = one batched network call on 2B rows (conditional and "
            "null-class scores together)"
        )
    if method == "classifier":
        desc["nfe_note"] = "NFE counts score evaluations; each adds one classifier gradient"
    return guide, desc


def sample_labels(cfg: dict, n: int, k: int) -> torch.Tensor:
    """The labels (n,) asked for by sampler.class_label, by global sample index."""
    return label_batch(cfg["sampler"]["class_label"], torch.arange(n), k, int(cfg["seed"]))


def conditional_metrics(
    dataset, x: torch.Tensor, labels: torch.Tensor | None, cfg: dict, images_uint8=None
) -> dict:
    """How often the samples are of their requested class, judged by the toolkit's digits/MNIST
    classifier (images, `metrics.classifier`, cached under outputs_root/features) or by the most
    responsible component (mixture data). Returns per-class shares (`conditional_accuracy`),
    their mean and the share of every predicted class; labels None: only the latter."""
    pred = predicted_classes(dataset, x, cfg, images_uint8)
    if pred is None:
        return {}
    k = dataset.n_classes
    counts = torch.bincount(pred, minlength=k).double()
    out = {"predicted_class_shares": (counts / max(len(pred), 1)).tolist()}
    if labels is None:
        return out
    labels = labels[: len(pred)]
    per = {}
    for c in labels.unique().tolist():
        sel = labels == c
        per[str(c)] = float((pred[sel] == c).double().mean())
    out["conditional_accuracy"] = per
    out["conditional_accuracy_mean"] = float((pred == labels).double().mean())
    out["conditional_judge"] = (
        "toolkit classifier (metrics.classifier)"
        if dataset.kind == "images"
        else "most responsible component"
    )
    return out


def predicted_classes(dataset, x: torch.Tensor, cfg: dict, images_uint8=None):
    """The class of each sample (N,) by the data set's judge, or None when there is none."""
    if dataset.kind == "images":
        if dataset.labels is None or images_uint8 is None:
            return None

        root = Path(cfg.get("outputs_root", "outputs"))
        clf, _, _ = load_or_train(
            dataset_uint8(dataset, "train"),
            dataset.labels["train"].numpy(),
            dataset_uint8(dataset, "test"),
            dataset.labels["test"].numpy(),
            root / "features",
        )
        xs = to_input(np.asarray(images_uint8))
        with torch.no_grad():
            return torch.cat([clf(xs[i : i + 512]).argmax(1) for i in range(0, len(xs), 512)])
    if dataset.mixture is not None:
        one = torch.ones(x.shape[0], dtype=torch.float64)
        return dataset.mixture.log_posterior_at(x, one, torch.zeros_like(one)).argmax(1)
    return None
