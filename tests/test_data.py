"""Data: every bad user file is refused with the file and the problem named; good ones load right.

Each case writes the bad file for real (wrong shape, strings, pickled objects, NaN, corrupt zip,
mixed image sizes ...) and loads it the way run.py does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runs import run_mode

from data import DataError, digits, folder_dataset, npz_dataset
from tasks.common import data_identity

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def images(n=10, size=4, hi=255, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, hi + 1, (n, size, size)).astype(np.float32)


def points(n=50, d=2) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)


def with_nan(a: np.ndarray, value=np.nan) -> np.ndarray:
    a = a.copy()
    a.flat[7] = value
    return a


def save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def truncated(path: Path) -> Path:
    save(path, x=points())
    path.write_bytes(path.read_bytes()[:200])
    return path


# (name, write(path, tmp) -> path, kwargs for npz_dataset, words the error must contain)
NPZ_CASES = [
    ("1-D", lambda p, t: save(p, x=np.arange(10.0)), {}, "shape (10,)"),
    ("5-D", lambda p, t: save(p, x=np.zeros((4, 1, 2, 2, 2))), {}, "not understood"),
    ("one row", lambda p, t: save(p, x=np.zeros((1, 3))), {}, "N >= 2"),
    ("empty axis", lambda p, t: save(p, x=np.zeros((5, 0))), {}, "no empty axis"),
    ("strings", lambda p, t: save(p, x=np.array([["a", "b"], ["c", "d"]])), {}, "not numeric"),
    ("bool", lambda p, t: save(p, x=np.ones((4, 2), dtype=bool)), {}, "not numeric"),
    (
        "objects",
        lambda p, t: save(p, x=np.array([[Payload(t / "PWNED")] * 2] * 3, dtype=object)),
        {},
        "Python objects",
    ),
    ("NaN", lambda p, t: save(p, x=with_nan(points())), {}, "1 NaN/inf values"),
    ("inf", lambda p, t: save(p, x=with_nan(points(), np.inf)), {}, "NaN/inf"),
    ("float64 overflow", lambda p, t: save(p, x=np.full((4, 2), 1e300)), {}, "float32 range"),
    (
        "outside range",
        lambda p, t: save(p, x=images(hi=300)),
        {"raw_range": (0, 255)},
        "outside the declared data.range",
    ),
    (
        "outside levels",
        lambda p, t: save(p, x=images(hi=300)),
        {"levels": 256},
        "outside the declared range of data.levels=256",
    ),
    ("not integers", lambda p, t: save(p, x=images(hi=200) + 0.5), {"levels": 256}, "not integers"),
    (
        "levels vs range",
        lambda p, t: save(p, x=images()),
        {"levels": 256, "raw_range": (0, 1)},
        "does not hold data.levels=256",
    ),
    ("bad levels", lambda p, t: save(p, x=images()), {"levels": 1}, "data.levels=1 must be >= 2"),
    ("bad range", lambda p, t: save(p, x=images()), {"raw_range": (5, 1)}, "LO < HI"),
    (
        "levels on points",
        lambda p, t: save(p, x=np.round(points() * 10) + 50),
        {"levels": 256},
        "applies to images",
    ),
    ("channels last", lambda p, t: save(p, x=np.zeros((4, 8, 8, 3))), {}, "channels-last"),
    ("several arrays", lambda p, t: save(p, x=points(), y=points()), {}, "data.key=NAME"),
    ("wrong key", lambda p, t: save(p, x=points()), {"key": "z"}, "has no array 'z'"),
    ("no arrays", lambda p, t: save(p), {}, "holds no arrays"),
    ("constant images", lambda p, t: save(p, x=np.ones((4, 3, 3))), {}, "all values equal"),
    (
        "corrupt zip",
        lambda p, t: (p.write_bytes(b"PK\x03\x04" + os.urandom(500)), p)[1],
        {},
        "not a readable .npz",
    ),
    ("truncated zip", lambda p, t: truncated(p), {}, "not a readable .npz"),
    ("garbage", lambda p, t: (p.write_bytes(b"hello, not numpy"), p)[1], {}, "not a .npz"),
    ("empty file", lambda p, t: (p.write_bytes(b""), p)[1], {}, "empty"),
    ("missing", lambda p, t: p, {}, "not found"),
]


@pytest.mark.parametrize(
    "write,kwargs,words", [c[1:] for c in NPZ_CASES], ids=[c[0] for c in NPZ_CASES]
)
def test_bad_npz_is_refused_naming_file_and_problem(tmp_path, write, kwargs, words):
    path = write(tmp_path / "user.npz", tmp_path)
    with pytest.raises(DataError) as e:
        npz_dataset(str(path), **kwargs)
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)
    assert not (tmp_path / "PWNED").exists()  # object arrays are never unpickled


def write_pngs(folder: Path, sizes, mode="L") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
            folder / f"img{i:03d}.png"
        )
    return folder


def not_an_image(folder: Path) -> Path:
    write_pngs(folder, [(8, 8)] * 3)
    (folder / "notes.png").write_text("this is text, not a PNG")
    return folder / "notes.png"


def sixteen_bit(folder: Path) -> Path:
    write_pngs(folder, [(8, 8)] * 3)
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(folder / "deep.png")
    return folder / "deep.png"


def test_bad_image_folders_are_refused_naming_file_and_problem(tmp_path):
    cases = {
        "mixed sizes": (
            lambda f: write_pngs(f, [(8, 8), (8, 8), (6, 8)]) / "img002.png",
            "differs from img000.png",
        ),
        "not an image": (not_an_image, "not a readable image"),
        "16-bit": (sixteen_bit, "16-bit"),
        "too few": (lambda f: write_pngs(f, [(8, 8)]), "found 1 images"),
        "missing": (lambda f: f, "not found"),
    }
    for name, (write, words) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        named = write(folder)
        with pytest.raises(DataError) as e:
            folder_dataset(str(folder))
        assert str(named) in str(e.value) and words in str(e.value), (name, str(e.value))
    with pytest.raises(DataError, match="data.channels=2"):
        folder_dataset(str(write_pngs(tmp_path / "ok", [(8, 8)] * 2)), channels=2)


def test_folder_image_size_crops_to_square_and_resizes_to_integer_levels(tmp_path):
    """data.image_size: images of any size and shape, centre-cropped and resized (Lanczos, 8-bit);
    null keeps the rule that all share one size."""
    folder = write_pngs(tmp_path / "mixed", [(8, 8), (12, 6), (6, 10), (5, 5)], mode="RGB")
    ds = folder_dataset(str(folder), channels=3, image_size=4)
    assert ds.shape == (3, 4, 4) and ds.levels == 256
    levels = ds.inverse_scaler(torch.cat([ds.train, ds.test]))
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.min() >= 0 and levels.max() <= 255
    # a 3:1 image is cropped to its centre, not squeezed: only the middle band is left
    wide = np.full((4, 12), 250, np.uint8)
    wide[:, 4:8] = 100
    (tmp_path / "wide").mkdir()
    for name in ("a", "b"):
        Image.fromarray(wide).save(tmp_path / "wide" / f"{name}.png")
    ds = folder_dataset(str(tmp_path / "wide"), image_size=4)
    assert torch.equal(ds.inverse_scaler(ds.train).round(), torch.full((1, 1, 4, 4), 100.0))
    with pytest.raises(DataError, match="differs from"):
        folder_dataset(str(folder), channels=3)
    with pytest.raises(DataError, match="data.image_size=0"):
        folder_dataset(str(folder), channels=3, image_size=0)
    # runs saved before data.image_size existed are the same data as image_size=null
    old_run, now = (
        {"name": "folder", "path": "d"},
        {"name": "folder", "path": "d", "image_size": None},
    )
    assert data_identity(old_run) == data_identity(now) != data_identity({**now, "image_size": 4})


def test_bad_data_through_run_py_is_one_line_and_exit_2(tmp_path):
    nan = save(tmp_path / "nan.npz", x=with_nan(points()))
    strings = save(tmp_path / "strings.npz", x=np.array([["a", "b"], ["c", "d"]]))
    folder = write_pngs(tmp_path / "mixed", [(8, 8), (6, 6)])
    cases = {
        nan: ["data=npz", f"data.path={nan}"],
        strings: ["data=npz", f"data.path={strings}"],
        folder / "img001.png": ["data=folder", f"data.path={folder}"],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    procs = {
        named: subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), *args, "logger.mode=disabled", "progress=false"],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for named, args in cases.items()
    }
    for named, p in procs.items():
        _, stderr = p.communicate(timeout=300)
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, (p.returncode, stderr[-2000:])
        assert lines[0].startswith("error: ") and str(named) in lines[0], lines


# --------------------------------------------------------------------------- good data


def test_valid_points_npz_trains_a_few_steps(tmp_path):
    x = points(200, 3) * 5 + 2
    path = save(tmp_path / "mine.npz", x=x)
    ds = npz_dataset(str(path))
    assert ds.shape == (3,) and ds.kind == "points" and ds.levels is None
    assert ds.train.shape[0] + ds.test.shape[0] == 200
    assert torch.allclose(
        ds.inverse_scaler(ds.scaler(torch.from_numpy(x))), torch.from_numpy(x), atol=1e-5
    )
    summary, out = run_mode(
        tmp_path,
        "npz",
        "data=npz",
        f"data.path={path}",
        "model=mlp",
        "model.hidden=32",
        "model.depth=2",
        "training.steps=5",
        "training.batch_size=32",
        "training.log_every=5",
    )
    assert summary["status"] == "finished" and summary["step"] == 5
    assert np.isfinite(summary["final_loss"])


def test_npz_images_with_levels_keep_the_declared_levels(tmp_path):
    """data.levels without data.range means levels 0..levels-1, even if the data span less."""
    raw = images(n=20, hi=200)  # levels in 0..200 of 256
    ds = npz_dataset(str(save(tmp_path / "img.npz", x=raw)), levels=256)
    assert ds.shape == (1, 4, 4) and ds.levels == 256 and ds.raw_range == (0.0, 255.0)
    both = torch.cat([ds.train, ds.test])
    assert both.min() >= -1 and both.max() <= 1
    assert sorted(ds.raw_levels(both).flatten().tolist()) == sorted(raw.flatten().tolist())
    with_key = npz_dataset(str(save(tmp_path / "two.npz", a=raw, b=points())), key="a")
    assert with_key.shape == (1, 4, 4)
    npy = tmp_path / "single.npy"
    np.save(npy, raw)
    assert npz_dataset(str(npy), levels=256).shape == (1, 4, 4)


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_valid_png_folder_loads_with_shape_levels_and_a_test_split(tmp_path, channels, mode):
    folder = write_pngs(tmp_path / "pngs", [(8, 8)] * 20, mode)
    ds = folder_dataset(str(folder), channels=channels)
    assert ds.shape == (channels, 8, 8) and ds.kind == "images" and ds.levels == 256
    assert ds.raw_range == (0.0, 255.0) and ds.test.shape[0] == 2 and ds.train.shape[0] == 18
    both = torch.cat([ds.train, ds.test])
    assert both.min() >= -1 and both.max() <= 1
    with Image.open(folder / "img000.png") as im:
        first = np.asarray(im, dtype=np.int64)
    first = first[None] if channels == 1 else first.transpose(2, 0, 1)
    assert any(torch.equal(ds.raw_levels(x), torch.from_numpy(first)) for x in both)


def test_digits_have_1797_images_17_levels_and_levels_round_trip():
    from sklearn.datasets import load_digits

    ds = digits()
    both = torch.cat([ds.train, ds.test])
    assert both.shape == (1797, 1, 8, 8) and ds.levels == 17 and ds.test.shape[0] == 180
    assert both.min() == -1 and both.max() == 1
    k = ds.raw_levels(both)
    assert k.min() == 0 and k.max() == 16
    assert torch.allclose(ds.scaler(k.float()), both, atol=1e-6)  # levels -> values -> levels
    raw = torch.from_numpy(load_digits().images).long()
    assert k.sum() == raw.sum() and torch.equal(k.flatten().bincount(), raw.flatten().bincount())
    ds256 = digits(256)
    assert ds256.levels == 256 and ds256.raw_levels(ds256.train).max() <= 255
