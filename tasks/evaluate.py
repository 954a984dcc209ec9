"""mode=eval: score existing image samples (a samples.npz or a folder of images) without sampling.

    python run.py mode=eval data=digits eval.path=outputs/sample/<run>/samples.npz
    python run.py mode=eval data=digits            # the newest mode=sample run of this data

The data config names the reference (its test split) and the training split (floors,
memorisation); the scores are those of `metrics.images.evaluate_images`, so samples made
elsewhere are compared with the same code. Writes metrics.json, samples.png and nearest_train.png.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from data.datasets import IMAGE_SUFFIXES
from metrics.images import (
    aggregate_seeds,
    check_eval_config,
    evaluate_images,
    raw_to_uint8,
    summary_line,
)
from sde_lib.io import atomic_write_text

from .common import UserError, build_dataset
from .figures import image_grid
from .logger import RunLogger

log = logging.getLogger(__name__)


def validate_eval(cfg: dict) -> dict:
    """The eval group checked (metrics.images.check_eval_config) plus eval.path's existence."""

    e = check_eval_config(cfg)
    if e["path"] is not None and not Path(e["path"]).expanduser().exists():
        raise UserError(
            f"eval.path={e['path']} does not exist; give a samples.npz file or a folder of images"
        )
    w = e["inception_weights"]
    if w is not None and not Path(w).expanduser().is_file():
        raise UserError(f"eval.inception_weights={w}: no such file")
    return e


def newest_samples(cfg: dict, data_name: str) -> Path:
    """samples.npz of the newest mode=sample run of data_name under outputs_root."""
    root = Path(cfg["outputs_root"])
    found = []
    for m in root.glob("sample/*/metrics.json"):
        try:
            meta = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        npz = m.parent / "samples.npz"
        if meta.get("data") == data_name and npz.is_file():
            found.append((npz.stat().st_mtime, npz))
    if not found:
        raise UserError(
            f"no mode=sample run of data={data_name} under {root}/sample; sample first "
            "or pass eval.path=samples.npz or an image folder"
        )
    return max(found)[1]


def load_samples(path: Path, dataset) -> np.ndarray:
    """uint8 (N, C, H, W) images from a .npz (key `samples`: the data's raw range, as mode=sample
    writes it; uint8 arrays are taken as 0..255) or a folder of equally sized images."""

    c = dataset.shape[0]
    if path.is_dir():
        from PIL import Image

        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"eval.path={path}: no images ({', '.join(IMAGE_SUFFIXES)})")
        arrays = []
        for f in files:
            try:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
            except Exception as e:
                raise UserError(f"{f}: not a readable image ({type(e).__name__})") from None
            arrays.append(a[None] if c == 1 else a.transpose(2, 0, 1))
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise UserError(f"eval.path={path}: images of different sizes {sorted(shapes)[:2]}")
        x = np.stack(arrays)
    else:
        try:
            with np.load(path, allow_pickle=False) as f:
                if "samples" not in f:
                    raise UserError(f"{path}: has no array 'samples' (it holds {list(f.keys())})")
                arr = f["samples"]
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
        if arr.ndim == 3:
            arr = arr[:, None]
        if arr.dtype.kind not in "uif" or (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
            raise UserError(f"{path}: 'samples' must be finite numbers; got dtype {arr.dtype}")
        x = arr if arr.dtype == np.uint8 else raw_to_uint8(dataset, arr)
    if x.shape[1:] != tuple(dataset.shape):
        raise UserError(
            f"{path}: images of shape {x.shape[1:]} do not match data={dataset.name} "
            f"{tuple(dataset.shape)}"
        )
    return x


def run_eval(cfg: dict, out_dir: Path) -> dict:
    """Score the samples in eval.path (or the newest sample run) against cfg's data set."""

    e = validate_eval(cfg)
    dataset = build_dataset(cfg["data"])
    if dataset.kind != "images":
        raise UserError(f"mode=eval scores images; data={dataset.name} holds points")
    path = Path(e["path"]).expanduser() if e["path"] else newest_samples(cfg, dataset.name)
    x = load_samples(path, dataset)
    n = e["n_samples"] or len(x)
    if n > len(x):
        raise UserError(f"eval.n_samples={n} but {path} holds {len(x)} samples")
    if n < 4:
        raise UserError(f"{path} holds {len(x)} samples; need at least 4")
    out_dir = Path(out_dir)
    results = []
    for s in e["seeds"]:
        idx = np.random.default_rng(s).permutation(len(x))[:n] if n < len(x) else slice(None)
        results.append(evaluate_images(dataset, x[idx], cfg, out_dir, seed=s))
    metrics = {
        "mode": "eval",
        "source": str(path),
        "data": dataset.name,
        "seeds": e["seeds"],
        **aggregate_seeds(results),
    }
    image_grid(x[:64], out_dir / "samples.png")
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    log.info(summary_line(metrics))
    log.info(
        f"wrote {out_dir / 'metrics.json'}, {out_dir / 'samples.png'}, "
        f"{metrics['nearest_neighbour_picture']}"
    )
    logger = RunLogger(cfg["logger"], out_dir, cfg, "eval")
    try:
        logger.summary(
            {
                k: v
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        logger.log_image("samples", out_dir / "samples.png")
        logger.log_image("nearest_train", Path(metrics["nearest_neighbour_picture"]))
    finally:
        logger.finish()
    return metrics
