"""Evaluation of image samples against a data set's splits: FID, KID, precision/recall,
memorisation, with test-vs-train floors at the same sample count.

Entry points (the caller owns sampling and seeds):

    evaluate_images(dataset, samples_uint8, cfg, out_dir, seed=0) -> dict
    aggregate_seeds(results: list[dict]) -> dict
    export_png(samples_uint8, folder) -> Path
    dataset_uint8(dataset, split) -> np.ndarray

Reference set: the test split (held-out images). The floors score `n` training images (a random
subset of the size of the sample set, drawn with `seed`) against the same test split, i.e. the
figure a perfect sampler would get with as many samples: FID and KID are biased upwards at small
sample counts, so a number is read against its floor. Memorisation is measured in pixel space
(images scaled to [0, 1]) against the training split, with the threshold from the test split.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from pathlib import Path

import numpy as np
import torch

from sde_lib.errors import UserError
from sde_lib.io import atomic_write

from .features import FEATURE_CHOICES, Features, build_features
from .fid import fid_from_features
from .kid import kid
from .neighbours import memorisation, precision_recall

log = logging.getLogger(__name__)

# metrics that aggregate_seeds reports as min and mean over seeds
SEED_METRICS = ("fid", "kid", "precision", "recall", "memorisation_share")


def dataset_uint8(dataset, split: str) -> np.ndarray:
    """The train or test split of an image data set as uint8 (N, C, H, W): the raw range mapped
    to 0..255 (as mode=sample writes its pictures)."""
    x = dataset.train if split == "train" else dataset.test
    r0, r1 = dataset.raw_range
    u = ((dataset.inverse_scaler(x) - r0) / (r1 - r0)).clamp(0, 1)
    return (u * 255).round().to(torch.uint8).numpy()


def raw_to_uint8(dataset, raw: np.ndarray) -> np.ndarray:
    """Samples in the data set's raw range (as in samples.npz["samples"]) -> uint8, clipped."""
    r0, r1 = dataset.raw_range
    u = np.clip((np.asarray(raw, dtype=np.float64) - r0) / (r1 - r0), 0, 1)
    return np.round(u * 255).astype(np.uint8)


def check_eval_config(cfg: dict) -> dict:
    """The eval group with defaults filled in; UserError on a bad key or value (one line)."""
    e = dict(cfg.get("eval") or {})
    allowed = {"n_samples", "seeds", "features", "inception_weights", "export_png", "only", "path"}
    for k in e:
        if k not in allowed:
            raise UserError(
                f"eval.{k} is not an eval option; allowed: {', '.join(sorted(allowed))}"
            )
    n = e.get("n_samples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
        raise UserError(f"eval.n_samples={n!r} is not allowed; allowed: an integer >= 2 or null")
    seeds = e.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (
        not isinstance(seeds, (list, tuple))
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
    ):
        raise UserError(
            f"eval.seeds={seeds!r} is not allowed; allowed: a non-empty list of "
            "integers >= 0, e.g. [0,1,2]"
        )
    f = e.get("features", "auto")
    if not isinstance(f, str) or (f not in FEATURE_CHOICES and ":" not in f):
        raise UserError(
            f"eval.features={f!r} is not allowed; allowed: "
            f"{', '.join(FEATURE_CHOICES)} or package.module:factory"
        )
    for k in ("export_png", "only"):
        if e.get(k, False) not in (True, False):
            raise UserError(f"eval.{k}={e.get(k)!r} is not allowed; allowed: true, false")
    for k in ("inception_weights", "path"):
        if e.get(k) is not None and not isinstance(e.get(k), str):
            raise UserError(f"eval.{k}={e.get(k)!r} is not allowed; allowed: a path or null")
    return {
        "n_samples": n,
        "seeds": list(seeds),
        "features": f,
        "inception_weights": e.get("inception_weights"),
        "export_png": bool(e.get("export_png", False)),
        "only": bool(e.get("only", False)),
        "path": e.get("path"),
    }


def _data_hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def reference_features(dataset, feats: Features, train_u8, test_u8, cache_dir: Path):
    """(train features, test features), float64, cached per data content and feature network
    under cache_dir (tensors only, weights_only load); features without a key are not cached."""
    path = None
    if feats.key is not None and feats.key != "pixels":
        name = f"ref-{dataset.name}-{_data_hash(train_u8, test_u8)}-{feats.key}.pt"
        path = Path(cache_dir) / name
        if path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                return saved["train"], saved["test"]
            except Exception as e:
                log.warning(
                    f"reference statistics {path} unreadable ({type(e).__name__}); recomputing"
                )
    f_train, f_test = feats(train_u8), feats(test_u8)
    if path is not None:
        buf = io.BytesIO()
        torch.save({"train": f_train, "test": f_test}, buf)
        atomic_write(path, lambda f: f.write(buf.getvalue()))
    return f_train, f_test


def evaluate_images(
    dataset, samples_uint8: np.ndarray, cfg: dict, out_dir: Path, seed: int = 0
) -> dict:
    """Score one set of samples of an image data set; write the nearest-neighbour picture (and
    the PNG folder with eval.export_png) under out_dir; return the metrics.json entries.

    dataset: a `data.datasets.Dataset` of kind "images" with train and test splits.
    samples_uint8: (N, C, H, W) uint8 in the data set's shape, N >= 4 (0..255 = the raw range;
        see `raw_to_uint8` for samples in the raw range).
    cfg: the run config (plain dict): cfg["eval"] (see conf/eval/default.yaml),
        cfg["outputs_root"] (feature and reference caches) and cfg["device"].
    seed: picks the training subset for the floors and the KID subsets.

    Returned keys: n_samples, n_reference, reference, features, feature_accuracy, fid,
    fid_floor_test_vs_train, n_floor, kid, kid_std, kid_floor, kid_floor_std, kid_subset_size,
    precision, recall,
    precision_floor, recall_floor, memorisation_share, memorisation_threshold,
    memorisation_space, nearest_neighbour_picture (and png_folder). fid and its floor are None
    when the features are raw pixels (no feature network: say so in `features`).
    """
    check_eval_config(cfg)
    x = np.asarray(samples_uint8)
    if x.dtype != np.uint8 or x.shape[1:] != tuple(dataset.shape) or x.shape[0] < 4:
        want = ", ".join(map(str, dataset.shape))
        raise UserError(
            f"samples of dtype {x.dtype} and shape {x.shape} do not fit "
            f"data={dataset.name}: expected uint8 (N >= 4, {want})"
        )
    out_dir = Path(out_dir)
    root = Path(cfg.get("outputs_root", "outputs"))
    train_u8, test_u8 = dataset_uint8(dataset, "train"), dataset_uint8(dataset, "test")
    if len(test_u8) < 5:
        raise UserError(
            f"data={dataset.name}: its test split holds {len(test_u8)} images; "
            "image metrics need at least 5 (k-NN radii with k = 3)"
        )
    feats = build_features(dataset, train_u8, test_u8, cfg)
    f_train, f_test = reference_features(dataset, feats, train_u8, test_u8, root / "features")
    f_s = feats(x)
    n = x.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    sub = torch.randperm(len(train_u8), generator=g)[: min(n, len(train_u8))]
    f_floor = f_train[sub]
    with_fid = feats.name != "pixels"
    # subsets of at most half the smaller set, so that the spread over subsets means something
    size = min(1000, max(2, min(n, len(test_u8)) // 2))
    kid_v, kid_s = kid(f_test, f_s, subset_size=size, seed=seed)
    kid_f, kid_fs = kid(f_test, f_floor, subset_size=size, seed=seed)
    p, r = precision_recall(f_test, f_s, k=3)
    pf, rf = precision_recall(f_test, f_floor, k=3)
    mem = memorisation(
        x.astype(np.float32) / 255,
        train_u8.astype(np.float32) / 255,
        test_u8.astype(np.float32) / 255,
    )
    picture = out_dir / "nearest_train.png"
    nearest_neighbour_picture(x, train_u8, mem["nn_index"].numpy(), picture)
    out = {
        "n_samples": int(n),
        "n_reference": int(len(test_u8)),
        "reference": f"test split of {dataset.name}",
        "features": feats.name,
        "feature_accuracy": feats.accuracy,
        "fid": fid_from_features(f_s, f_test) if with_fid else None,
        "fid_floor_test_vs_train": fid_from_features(f_floor, f_test) if with_fid else None,
        "n_floor": int(len(sub)),
        "kid": kid_v,
        "kid_std": kid_s,
        "kid_floor": kid_f,
        "kid_floor_std": kid_fs,
        "kid_subset_size": size,
        "precision": p,
        "recall": r,
        "precision_floor": pf,
        "recall_floor": rf,
        "memorisation_share": mem["share"],
        "memorisation_threshold": mem["threshold"],
        "memorisation_space": "pixels in [0, 1], threshold: 1st percentile of test-to-train "
        "nearest distances",
        "nearest_neighbour_picture": str(picture),
    }
    if check_eval_config(cfg)["export_png"]:
        out["png_folder"] = str(export_png(x, out_dir / "samples_png"))
    return out


def aggregate_seeds(results: list[dict]) -> dict:
    """Combine evaluate_images results of several seeds: the first result's fields, with each of
    SEED_METRICS replaced by its mean, plus <key>_min and <key>_mean, and `per_seed` (the list).
    One result is returned unchanged."""
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    for k in SEED_METRICS:
        vals = [r[k] for r in results if r.get(k) is not None]
        if vals:
            out[k], out[f"{k}_min"], out[f"{k}_mean"] = (
                float(np.mean(vals)),
                min(vals),
                float(np.mean(vals)),
            )
    out["per_seed"] = [{k: r.get(k) for k in SEED_METRICS} for r in results]
    return out


def _to_pil(im: np.ndarray):
    from PIL import Image

    a = im.transpose(1, 2, 0)
    return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)


def export_png(samples_uint8: np.ndarray, folder: Path) -> Path:
    """Write each image (N, C, H, W) uint8 as folder/000000.png (grey L or RGB): the layout
    standard FID tools read. Each file is written atomically."""
    folder = Path(folder)
    width = max(6, len(str(len(samples_uint8) - 1)))
    for i, im in enumerate(samples_uint8):
        buf = io.BytesIO()
        _to_pil(im).save(buf, format="PNG")
        atomic_write(folder / f"{i:0{width}d}.png", lambda f, b=buf: f.write(b.getvalue()))
    return folder


def nearest_neighbour_picture(
    samples_uint8, train_uint8, nn_index, path: Path, n: int = 32, min_size: int = 64
) -> None:
    """PNG of up to n samples, each beside its nearest training image (pairs in columns of 4),
    upscaled (nearest) so an image is at least min_size pixels; written atomically."""
    from PIL import Image

    k = min(n, len(samples_uint8))
    _, c, h, w = samples_uint8.shape
    scale = max(1, math.ceil(min_size / max(h, w)))
    pairs_per_row = 4
    rows = math.ceil(k / pairs_per_row)
    pad, gap = 2, 8
    cell_w = 2 * w * scale + pad
    canvas = np.full(
        (rows * (h * scale + pad) + pad, pairs_per_row * (cell_w + gap) + pad, c),
        255,
        dtype=np.uint8,
    )
    for i in range(k):
        r, q = divmod(i, pairs_per_row)
        y0, x0 = pad + r * (h * scale + pad), pad + q * (cell_w + gap)
        for j, im in enumerate((samples_uint8[i], train_uint8[int(nn_index[i])])):
            big = im.transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
            xs = x0 + j * (w * scale + pad)
            canvas[y0 : y0 + h * scale, xs : xs + w * scale] = big
    pil = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


def summary_line(m: dict) -> str:
    """One log line of the main figures."""
    parts = [
        f"{m['n_samples']} samples vs {m['n_reference']} test images ({m['features']}"
        + (f", accuracy {m['feature_accuracy']:.3f}" if m.get("feature_accuracy") else "")
        + ")"
    ]
    if m.get("fid") is not None:
        parts.append(f"FID {m['fid']:.3f} (floor {m['fid_floor_test_vs_train']:.3f})")
    parts.append(f"KID {m['kid']:.4f}±{m['kid_std']:.4f} (floor {m['kid_floor']:.4f})")
    parts.append(
        f"precision {m['precision']:.3f} recall {m['recall']:.3f} (floors "
        f"{m['precision_floor']:.3f}, {m['recall_floor']:.3f})"
    )
    parts.append(f"memorisation {m['memorisation_share']:.3f}")
    return "; ".join(parts)


__all__ = [
    "aggregate_seeds",
    "dataset_uint8",
    "evaluate_images",
    "export_png",
    "nearest_neighbour_picture",
    "raw_to_uint8",
    "summary_line",
]
