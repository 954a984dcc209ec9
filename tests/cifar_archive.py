"""Small CIFAR-10 archives in the official formats (https://www.cs.toronto.edu/~kriz/cifar.html),
for tests: the python version (pickled dicts, as Python 2 wrote them) and the binary version."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def batch_arrays(b: int, per_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch b's (per_batch, 3072) uint8 pixels and (per_batch,) labels: deterministic, every
    image different, pixel values spread over 0..255."""
    i = np.arange(per_batch)[:, None] + per_batch * b
    x = ((i * 37 + np.arange(3072)[None] * 11) % 256).astype(np.uint8)
    y = (np.arange(per_batch) + b) % 10
    return x, y


def pickled(obj) -> bytes:
    """obj pickled as in the official archive: protocol 3 writes bytes as bytes (protocol 2 under
    Python 3 would go through _codecs.encode), and numpy's constructor under the name numpy 1
    gave it, numpy.core.multiarray, which Python 2's cPickle wrote."""
    raw = pickle.dumps(obj, protocol=3)
    return raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def batch_files(version: str, per_batch: int) -> dict[str, bytes]:
    """{file name: contents} of the extracted cifar-10-batches-py/ or cifar-10-batches-bin/."""
    files = {}
    for b, name in enumerate(BATCHES):
        x, y = batch_arrays(b, per_batch)
        if version == "python":
            files[name] = pickled(
                {
                    b"batch_label": name.encode(),
                    b"labels": [int(v) for v in y],
                    b"data": x,
                    b"filenames": [f"img_{b}_{k}.png".encode() for k in range(per_batch)],
                }
            )
        else:
            files[f"{name}.bin"] = np.concatenate([y[:, None].astype(np.uint8), x], 1).tobytes()
    if version == "python":
        meta = {b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
        files["batches.meta"] = pickled(meta)
    else:
        files["batches.meta.txt"] = ("\n".join(CLASSES) + "\n\n").encode()
    files["readme.html"] = b"<html>CIFAR-10</html>"
    return files


def write_archive(dir: str | Path, files: dict[str, bytes], version: str, packed: bool) -> Path:
    """files as the official .tar.gz (packed) or as its extracted folder, under dir."""
    dir, folder = Path(dir), {"python": "cifar-10-batches-py", "binary": "cifar-10-batches-bin"}
    dir.mkdir(parents=True, exist_ok=True)
    if not packed:
        out = dir / folder[version]
        out.mkdir()
        for name, data in files.items():
            (out / name).write_bytes(data)
        return out
    out = dir / f"cifar-10-{version}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder[version]}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def make_cifar_archive(
    dir: str | Path, version: str = "python", per_batch: int = 6, packed: bool = True
) -> Path:
    """A CIFAR-10 archive with per_batch images in each of its 6 batches (see batch_arrays):
    cifar-10-{version}.tar.gz, or its extracted folder when not packed. Returns its path."""
    return write_archive(dir, batch_files(version, per_batch), version, packed)
