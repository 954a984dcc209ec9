"""CIFAR-10 read in place from the official archive (https://www.cs.toronto.edu/~kriz/cifar.html).

Both official versions are read: the python one (`cifar-10-python.tar.gz`, batches pickled as
dicts holding a (N, 3072) uint8 array and a list of labels) and the binary one
(`cifar-10-binary.tar.gz`, records of 1 label byte + 3072 pixel bytes), as the .tar.gz itself
(members are read from the archive, nothing is extracted to disk), the folder extracted from it, or
a folder holding either. The split is the official one: train = data_batch_1..5, test = test_batch.

The pickles are read by an unpickler that rebuilds plain numpy arrays and refuses every other
Python object, because unpickling an arbitrary global can run code.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .datasets import DataError, Dataset

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
EXPECTED = (
    f"cifar-10-python.tar.gz or cifar-10-binary.tar.gz (or the folder extracted from it) from {URL}"
)
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SIDE, PIXELS = 32, 3 * 32 * 32
RECORD = 1 + PIXELS  # binary version: one label byte, then the 3x32x32 pixels
TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST = "test_batch"
VERSIONS = {  # version -> (its extracted folder, its batch files, its label-names file)
    "python": ("cifar-10-batches-py", (*TRAIN, TEST), "batches.meta"),
    "binary": (
        "cifar-10-batches-bin",
        tuple(f"{n}.bin" for n in (*TRAIN, TEST)),
        "batches.meta.txt",
    ),
}
ARCHIVES = ("cifar-10-python.tar.gz", "cifar-10-binary.tar.gz")


# --------------------------------------------------------------------------- restricted unpickling

# numpy pickles an array as _reconstruct(ndarray, shape, dtype) plus its state; the official files
# (numpy 1) name numpy.core.multiarray, numpy 2 names numpy._core.multiarray. The objects are taken
# from numpy itself rather than imported by the names in the file.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, strings, numbers and plain numpy arrays; any other global is refused
    before it is looked up, so nothing named in the file is imported or called."""

    def __init__(self, file, where: str):
        # encoding="bytes": the official batches are Python 2 pickles whose str are bytes here
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise DataError(
            f"{self.where}: holds a Python object {module}.{name}, not only numpy arrays; "
            "refused: unpickling it could run code (use the official archive from "
            f"{URL})"
        )


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), where).load()
    except DataError:
        raise
    except Exception as e:  # not a pickle, truncated ...
        raise DataError(
            f"{where}: not a readable pickled CIFAR-10 batch ({type(e).__name__}: {e}); "
            f"expected {EXPECTED}"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: holds a {type(obj).__name__}, not the dict of a CIFAR-10 batch")
    # Python 2 pickles give bytes keys; a batch pickled again under Python 3 gives str keys
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


# --------------------------------------------------------------------------- batch parsers


def _labels(y, n: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise DataError(
            f"{where}: labels of shape {y.shape} dtype {y.dtype}; expected {n} integers 0..9"
        )
    if y.min() < 0 or y.max() > 9:
        bad = int(y[(y < 0) | (y > 9)][0])
        raise DataError(f"{where}: label {bad} outside 0..9")
    return y.astype(np.int64)


def _python_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A pickled batch -> (N, 3, 32, 32) uint8 pixels, (N,) int64 labels."""
    batch = _unpickle(raw, where)
    if "data" not in batch or "labels" not in batch:
        raise DataError(
            f"{where}: a batch dict with keys {sorted(map(str, batch))}; expected b'data' and "
            f"b'labels' (CIFAR-10, not CIFAR-100: {URL})"
        )
    x = batch["data"]
    if not (
        type(x) is np.ndarray
        and x.dtype == np.uint8
        and x.ndim == 2
        and x.shape[0] > 0
        and x.shape[1] == PIXELS
    ):
        got = f"{x.shape} {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(
            f"{where}: b'data' is {got}; expected an (N, {PIXELS}) uint8 array "
            "(N >= 1 images of 3x32x32 pixels, row-major CHW)"
        )
    labels = batch["labels"]
    if not isinstance(labels, (list, np.ndarray)):
        raise DataError(f"{where}: b'labels' is a {type(labels).__name__}; expected a list")
    return x.reshape(-1, 3, SIDE, SIDE), _labels(labels, x.shape[0], where)


def _binary_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Records of 1 label byte + 3072 pixel bytes -> (N, 3, 32, 32) uint8, (N,) int64."""
    if len(raw) == 0 or len(raw) % RECORD:
        raise DataError(
            f"{where}: {len(raw)} bytes is not a whole, non-zero number of {RECORD}-byte records "
            f"(1 label byte + {PIXELS} pixel bytes); the file is truncated or not CIFAR-10 "
            f"binary ({URL})"
        )
    rec = np.frombuffer(raw, np.uint8).reshape(-1, RECORD)
    return rec[:, 1:].reshape(-1, 3, SIDE, SIDE), _labels(rec[:, 0], rec.shape[0], where)


def _python_classes(raw: bytes, where: str) -> list[str]:
    names = _unpickle(raw, where).get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{where}: no list of b'label_names'")
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


def _binary_classes(raw: bytes, where: str) -> list[str]:
    # one name a line; the official file ends with blank lines
    return [ln.strip() for ln in raw.decode("utf-8", "replace").splitlines() if ln.strip()]


PARSERS: dict[str, Callable] = {
    **{n: _python_batch for n in VERSIONS["python"][1]},
    **{n: _binary_batch for n in VERSIONS["binary"][1]},
    VERSIONS["python"][2]: _python_classes,
    VERSIONS["binary"][2]: _binary_classes,
}


# --------------------------------------------------------------------------- where the files are


def _tar_members(p: Path) -> Iterator[tuple[str, str, bytes]]:
    """(file name, where, contents) of the archive's members that CIFAR-10 needs, in one pass
    over the stream: "r|*" reads each member as it comes, never seeking back through the gzip."""
    try:
        with tarfile.open(p, "r|*") as tar:
            for m in tar:
                name = m.name.rsplit("/", 1)[-1]
                if m.isfile() and name in PARSERS:
                    yield name, f"{p}:{m.name}", tar.extractfile(m).read()
    except Exception as e:  # not a tar, not gzip, truncated ...
        raise DataError(
            f"{p}: not a readable .tar.gz archive ({type(e).__name__}: {e}); expected {EXPECTED}"
        ) from None


def _folder_members(d: Path) -> Iterator[tuple[str, str, bytes]]:
    for name in PARSERS:
        if (d / name).is_file():
            yield name, str(d / name), (d / name).read_bytes()


def _members(p: Path):
    """The members of the archive or folder at p (see the module docstring for what is read)."""
    if p.is_file():
        return _tar_members(p)
    if any((p / n).is_file() for n in PARSERS):  # the extracted folder itself
        return _folder_members(p)
    for folder, _, _ in VERSIONS.values():  # a folder holding it (python version first)
        if (p / folder).is_dir():
            return _folder_members(p / folder)
    for archive in ARCHIVES:
        if (p / archive).is_file():
            return _tar_members(p / archive)
    raise DataError(
        f"{p}: holds none of data_batch_1..5 + test_batch, their .bin versions, "
        f"{', '.join(f'{v[0]}/' for v in VERSIONS.values())} or {', '.join(ARCHIVES)}; "
        f"expected {EXPECTED}"
    )


def _read(p: Path) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """(version, {batch name: (pixels, labels)}, class names) of the archive or folder at p."""
    got = {}
    for name, where, raw in _members(p):
        if name in got:
            raise DataError(f"{where}: a second {name} in {p}; keep one copy of CIFAR-10 there")
        got[name] = PARSERS[name](raw, where)
    have = {v: [n for n in files if n in got] for v, (_, files, _) in VERSIONS.items()}
    # the complete version (python first); else the one nearer complete names what is missing
    version = max(VERSIONS, key=lambda v: len(have[v]))
    folder, names, meta = VERSIONS[version]
    missing = [n for n in names if n not in got]
    if missing:
        raise DataError(
            f"{p}: missing {', '.join(missing)} of the {version} version of CIFAR-10 ({folder}/ "
            f"holds {', '.join(names[:5])} and {names[5]}); expected {EXPECTED}"
        )
    classes = got.get(meta, list(CLASSES))
    if len(classes) != len(CLASSES):
        raise DataError(f"{p}: {meta} names {len(classes)} classes, not {len(CLASSES)}")
    # keyed by the python version's names: data_batch_1.bin -> data_batch_1
    return version, {n.removesuffix(".bin"): got[n] for n in names}, classes


# --------------------------------------------------------------------------- the data set


def _to_model_space(parts: list[np.ndarray], size: int, ds: Dataset) -> torch.Tensor:
    """uint8 batches -> one (N, 3, size, size) float32 tensor in the model range, filled in place
    chunk by chunk, so the only full-size copy is the result (600 MB for 50000 images at 32)."""
    n = sum(len(x) for x in parts)
    out = torch.empty((n, 3, size, size))
    i = 0
    for x in parts:
        for chunk in np.array_split(x, max(1, len(x) // 2000)):
            y = torch.from_numpy(np.ascontiguousarray(chunk)).float()
            if size != SIDE:
                # antialiased bilinear (a triangle filter as wide as the scale factor), rounded back
                # to integer levels 0..255 so the data keep 256 levels and bits/dim stays defined
                y = torch.nn.functional.interpolate(
                    y, size=(size, size), mode="bilinear", antialias=True, align_corners=False
                )
                y = y.round_().clamp_(0, 255)
            out[i : i + len(y)] = y
            i += len(y)
    # ds.scaler, in place: m0 + (raw - r0) * (m1 - m0) / (r1 - r0)
    (r0, r1), (m0, m1) = ds.raw_range, ds.model_range
    return out.sub_(r0).mul_((m1 - m0) / (r1 - r0)).add_(m0)


def cifar10(path: str, image_size: int = 32) -> Dataset:
    """CIFAR-10's official train (data_batch_1..5) and test (test_batch) splits, 256 levels scaled
    to [-1, 1], with labels and `meta["classes"]`; resized to image_size x image_size when it is
    not 32 (antialiased bilinear, rounded to integer levels)."""
    if type(image_size) is not int or image_size < 1:
        raise DataError(f"data.image_size={image_size!r} is not a positive integer; e.g. 32")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"CIFAR-10 archive {p} not found; set data.path to {EXPECTED}")
    version, batches, classes = _read(p)
    ds = Dataset(
        "cifar10",
        (3, image_size, image_size),
        "images",
        levels=256,
        raw_range=(0.0, 255.0),
        meta={"source": str(p), "version": version, "classes": classes},
    )
    if image_size != SIDE:
        ds.meta["resize"] = "bilinear, antialiased (torch), rounded to 0..255"
    ds.labels = {
        "train": torch.from_numpy(np.concatenate([batches[n][1] for n in TRAIN])),
        "test": torch.from_numpy(batches[TEST][1]),
    }
    ds.train = _to_model_space([batches[n][0] for n in TRAIN], image_size, ds)
    ds.test = _to_model_space([batches[TEST][0]], image_size, ds)
    return ds
