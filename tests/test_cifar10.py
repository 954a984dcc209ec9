"""data=cifar10: tiny archives in both official formats (packed and extracted) load with the exact
pixels, labels and split; every broken archive is refused in one line naming the file; a pickled
object other than numpy's arrays is refused without being run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_archive import (
    CLASSES,
    batch_arrays,
    batch_files,
    make_cifar_archive,
    pickled,
    write_archive,
)
from PIL import Image
from runs import compose_cfg, run_mode

from data import DataError, cifar10
from tasks import UserError, validate
from tasks.common import build_dataset

ROOT = Path(__file__).resolve().parents[1]
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
PER = 6
LAYOUTS = [(v, packed) for v in ("python", "binary") for packed in (True, False)]


def raw_split(
    per_batch: int = PER,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The helper's pixels and labels as the official split: train = batches 1..5, test = 6th."""
    xs, ys = zip(*(batch_arrays(b, per_batch) for b in range(6)))
    x = torch.from_numpy(np.concatenate(xs)).reshape(-1, 3, 32, 32)
    y = torch.from_numpy(np.concatenate(ys))
    n = 5 * per_batch
    return x[:n], y[:n], x[n:], y[n:]


@pytest.mark.parametrize("version,packed", LAYOUTS)
def test_both_versions_packed_or_extracted_load_exact_pixels_labels_and_split(
    tmp_path, version, packed
):
    path = make_cifar_archive(tmp_path, version, PER, packed)
    ds = cifar10(str(path))
    x_train, y_train, x_test, y_test = raw_split()
    assert ds.shape == (3, 32, 32) and ds.kind == "images" and ds.levels == 256
    assert ds.raw_range == (0.0, 255.0) and ds.model_range == (-1.0, 1.0)
    assert ds.train.dtype == torch.float32 and ds.train.shape == (5 * PER, 3, 32, 32)
    assert ds.test.shape == (PER, 3, 32, 32)
    # the official order, pixel for pixel: k -> -1 + 2k/255, and back to the same integers
    assert torch.equal(ds.train, ds.scaler(x_train.float()))
    assert torch.equal(ds.test, ds.scaler(x_test.float()))
    assert ds.train.min() == -1 and ds.train.max() == 1
    assert torch.equal(ds.raw_levels(ds.train), x_train.long())
    assert torch.equal(ds.raw_levels(ds.test), x_test.long())
    assert ds.labels["train"].dtype == torch.int64 and ds.labels["test"].dtype == torch.int64
    assert torch.equal(ds.labels["train"], y_train) and torch.equal(ds.labels["test"], y_test)
    assert ds.meta["classes"] == CLASSES and ds.meta["version"] == version
    assert ds.n_classes == 10


def test_found_from_a_parent_folder_and_classes_default_without_meta(tmp_path):
    extracted = make_cifar_archive(tmp_path / "a", "binary", PER, packed=False)
    assert cifar10(str(extracted.parent)).meta["version"] == "binary"
    packed = make_cifar_archive(tmp_path / "b", "python", PER, packed=True)
    assert cifar10(str(packed.parent)).meta["source"] == str(packed.parent)
    files = batch_files("python", PER)
    del files["batches.meta"]
    path = write_archive(tmp_path / "c", files, "python", packed=True)
    assert cifar10(str(path)).meta["classes"] == CLASSES  # the standard names


def test_a_batch_as_python_2_pickled_it_is_read():
    """The official batches are Python 2 cPickle files (protocol 2): str as SHORT_BINSTRING, the
    array rebuilt by numpy.core.multiarray._reconstruct; written here opcode by opcode."""
    from data.cifar10 import _python_batch

    def s(b: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(b)]) + b

    x, y = batch_arrays(0, 2)
    dtype = (
        s(b"u1")
        + b"K\x00K\x01\x87R(K\x03"
        + s(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + s(b"b")
        + b"\x87R(K\x01K\x02M\x00\x0c\x86cnumpy\ndtype\n"
        + dtype
        + b"\x89T"
        + len(x.tobytes()).to_bytes(4, "little")
        + x.tobytes()
        + b"tb"
    )
    labels = b"](K" + bytes([int(y[0])]) + b"K" + bytes([int(y[1])]) + b"e"
    raw = b"\x80\x02}(" + s(b"data") + array + s(b"labels") + labels + b"u."
    pixels, got = _python_batch(raw, "py2")
    assert np.array_equal(pixels, x.reshape(2, 3, 32, 32)) and got.tolist() == y.tolist()


def test_image_size_resizes_to_integer_levels(tmp_path):
    ds = cifar10(str(make_cifar_archive(tmp_path, "python", PER)), image_size=16)
    assert ds.shape == (3, 16, 16) and ds.train.shape == (5 * PER, 3, 16, 16)
    levels = ds.inverse_scaler(ds.train)
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.min() >= 0
    assert levels.max() <= 255 and ds.levels == 256
    # antialiased bilinear is PIL's reducing bilinear (a triangle filter twice as wide when
    # halving): the same levels, up to PIL's fixed-point rounding
    x_train = raw_split()[0].numpy()
    pil = [
        [np.asarray(Image.fromarray(c).resize((16, 16), Image.Resampling.BILINEAR)) for c in im]
        for im in x_train
    ]
    assert (levels - torch.from_numpy(np.array(pil, np.float32))).abs().max() <= 1
    assert torch.equal(ds.labels["train"], raw_split()[1])


def flip_pickle(files: dict) -> dict:
    """The python version with data_batch_2's pixels as (N, 3000): a wrong shape."""
    x, y = batch_arrays(1, PER)
    files["data_batch_2"] = pickled({b"data": x[:, :3000].copy(), b"labels": [int(v) for v in y]})
    return files


def foreign_global(marker: Path):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    def write(files: dict) -> dict:
        x, y = batch_arrays(2, PER)
        files["data_batch_3"] = pickled(
            {b"data": x, b"labels": [int(v) for v in y], b"x": Payload()}
        )
        return files

    return write


def drop(name: str):
    def write(files: dict) -> dict:
        del files[name]
        return files

    return write


def truncate(name: str):
    def write(files: dict) -> dict:
        files[name] = files[name][:-100]
        return files

    return write


def label(name: str, value: int):
    def write(files: dict) -> dict:
        raw = bytearray(files[name])
        raw[0] = value  # the first record's label byte
        files[name] = bytes(raw)
        return files

    return write


# (name, version, how the files are broken, packed, what the message must say, the file it names)
BROKEN = [
    ("missing test batch", "python", drop("test_batch"), True, "missing test_batch", None),
    (
        "missing data batch",
        "binary",
        drop("data_batch_3.bin"),
        False,
        "missing data_batch_3.bin",
        None,
    ),
    (
        "truncated bin",
        "binary",
        truncate("data_batch_2.bin"),
        False,
        "not a whole",
        "data_batch_2.bin",
    ),
    (
        "truncated bin in tar",
        "binary",
        truncate("test_batch.bin"),
        True,
        "3073-byte",
        "test_batch.bin",
    ),
    (
        "label 10",
        "binary",
        label("data_batch_1.bin", 10),
        True,
        "label 10 outside 0..9",
        "data_batch_1",
    ),
    ("wrong shape", "python", flip_pickle, False, "(6, 3000) uint8", "data_batch_2"),
    (
        "not a pickle",
        "python",
        lambda f: {**f, "data_batch_4": b"hello"},
        True,
        "not a readable pickled",
        "data_batch_4",
    ),
]


@pytest.mark.parametrize(
    "version,write,packed,words,names", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN]
)
def test_broken_archives_are_refused_in_one_line(tmp_path, version, write, packed, words, names):
    path = write_archive(tmp_path, write(batch_files(version, PER)), version, packed)
    with pytest.raises(DataError) as e:
        cifar10(str(path))
    msg = str(e.value)
    assert words in msg and str(path) in msg and "\n" not in msg, msg
    assert names is None or names in msg, msg


def test_a_foreign_pickled_object_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    files = foreign_global(marker)(batch_files("python", PER))
    for packed in (True, False):
        path = write_archive(tmp_path / str(packed), dict(files), "python", packed)
        with pytest.raises(DataError) as e:
            cifar10(str(path))
        msg = str(e.value)
        assert "holds a Python object posix.system" in msg or "nt.system" in msg, msg
        assert "refused: unpickling it could run code" in msg and "data_batch_3" in msg, msg
        assert "\n" not in msg and not marker.exists()


def test_not_an_archive_or_layout_is_refused_naming_what_to_get(tmp_path):
    text = tmp_path / "cifar.tar.gz"
    text.write_text("not an archive")
    (tmp_path / "empty").mkdir()
    packed = make_cifar_archive(tmp_path / "cut", "python", PER)
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    cases = {
        tmp_path / "nowhere": "not found",
        text: "not a readable .tar.gz archive",
        truncated: "not a readable .tar.gz archive",
        tmp_path / "empty": "holds none of data_batch_1..5",
    }
    for path, words in cases.items():
        with pytest.raises(DataError) as e:
            cifar10(str(path))
        msg = str(e.value)
        assert str(path) in msg and words in msg and URL in msg and "\n" not in msg, msg
    with pytest.raises(UserError, match="not found"):  # as run.py builds it
        build_dataset({"name": "cifar10", "path": str(tmp_path / "nowhere"), "image_size": 32})
    with pytest.raises(DataError, match="data.image_size=0"):
        cifar10(str(tmp_path / "empty"), image_size=0)


def test_config_validates_image_size_and_trains_a_step(tmp_path):
    path = make_cifar_archive(tmp_path, "binary", 4)
    with pytest.raises(UserError, match="data.image_size=0"):
        validate(compose_cfg(tmp_path, "data=cifar10", f"data.path={path}", "data.image_size=0"))
    summary, _ = run_mode(
        tmp_path,
        "c",
        "data=cifar10",
        f"data.path={path}",
        "data.image_size=8",
        "model=unet",
        "model.ch=8",
        "training.steps=2",
        "training.batch_size=4",
        "training.log_every=1",
    )
    assert summary["status"] == "finished" and summary["step"] == 2


def test_bad_path_through_run_py_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "no-cifar.tar.gz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "data=cifar10", f"data.path={bad}"]
        + ["logger.mode=disabled", "progress=false"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-2000:])
    assert lines[0].startswith("error: ") and str(bad) in lines[0] and URL in lines[0], lines
