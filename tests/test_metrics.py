"""Image metrics: closed forms for the Fréchet distance and KID, precision/recall and memorisation
limits, the feature classifier, the Inception-v3 loading path, and mode=eval end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from runs import log_lines

from metrics.fid import fid_from_features, frechet_distance, gaussian_fit, trace_sqrt_product
from metrics.kid import kid, mmd2_unbiased
from metrics.neighbours import memorisation, precision_recall

# ---------------------------------------------------------------- Fréchet distance


def _spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    d = 6
    mu1, mu2 = torch.randn(d, generator=g).double(), torch.randn(d, generator=g).double()
    s = _spd(d, g)
    # equal covariances: only the means count
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(float((mu1 - mu2).square().sum()))
    # diagonal covariances: sum (sqrt(a_i) - sqrt(b_i))^2 + |mu1 - mu2|^2
    a, b = torch.rand(d, generator=g).double() + 0.1, torch.rand(d, generator=g).double() + 0.1
    want = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(want)
    # commuting covariances S and c^2 S: Tr(S) (1 - c)^2
    assert frechet_distance(mu1, s, mu1, 4 * s) == pytest.approx(float(s.trace()), rel=1e-10)
    # general case against scipy's matrix square root
    import scipy.linalg

    s2 = _spd(d, g)
    ref = float(np.trace(scipy.linalg.sqrtm((s @ s2).numpy())).real)
    assert trace_sqrt_product(s, s2) == pytest.approx(ref, rel=1e-9)
    # a singular covariance (rank 2 in 6-D) does not fail and stays >= 0
    low = torch.randn(d, 2, generator=g, dtype=torch.float64)
    v = frechet_distance(mu1, low @ low.T, mu1, low @ low.T)
    assert 0 <= v < 1e-6


def test_fid_on_gaussian_samples_and_against_torchmetrics():
    g = torch.Generator().manual_seed(1)
    d, n = 4, 20000
    s1, s2 = torch.diag(torch.tensor([1.0, 2.0, 0.5, 1.5])), torch.diag(torch.ones(4) * 0.8)
    x = torch.randn(n, d, generator=g) @ s1.sqrt()
    y = torch.randn(n, d, generator=g) @ s2.sqrt() + 0.3
    exact = frechet_distance(torch.zeros(d), s1, torch.full((d,), 0.3), s2)
    assert fid_from_features(x, y) == pytest.approx(exact, abs=0.03)
    fid_tm = pytest.importorskip("torchmetrics.image.fid")
    f1, f2 = torch.rand(300, 32, generator=g).double(), torch.rand(400, 32, generator=g).double()
    (m1, c1), (m2, c2) = gaussian_fit(f1), gaussian_fit(f2)
    theirs = float(fid_tm._compute_fid(m1, c1, m2, c2))
    assert fid_from_features(f1, f2) == pytest.approx(theirs, rel=1e-6)


# ---------------------------------------------------------------- KID


def test_kid_closed_form_and_torchmetrics():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, generator=g).double(), torch.randn(7, 3, generator=g).double()

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / 42
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(7)) / 35
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    # one law: KID about 0; a shifted law: clearly positive
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    mean, std = kid(a, b, n_subsets=20, subset_size=200)
    assert abs(mean) < 3 * std + 1e-3 and std > 0
    assert kid(a, b + 1.0, n_subsets=20, subset_size=200)[0] > 0.5
    kid_tm = pytest.importorskip("torchmetrics.image.kid")
    f1, f2 = torch.rand(50, 16, generator=g).double(), torch.rand(50, 16, generator=g).double()
    assert mmd2_unbiased(f1, f2) == pytest.approx(float(kid_tm.poly_mmd(f1, f2)), rel=1e-9)


# ---------------------------------------------------------------- precision/recall, memorisation


def test_precision_recall_limits():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(300, 5, generator=g)
    assert precision_recall(a, a.clone()) == (1.0, 1.0)
    p, r = precision_recall(a, a + 100)
    assert p == 0 and r == 0
    # samples collapsed on half of the data: full precision, lower recall
    half = a[a[:, 0] > 0]
    p, r = precision_recall(a, half)
    assert p == 1.0 and r < 0.75


@pytest.fixture(scope="module")
def digits_u8():
    from data.datasets import digits
    from metrics.images import dataset_uint8

    d = digits()
    return d, dataset_uint8(d, "train"), dataset_uint8(d, "test")


def test_memorisation_share(digits_u8):
    _, train, test = digits_u8
    rng = np.random.default_rng(0)
    copies = np.clip(train[:200] + rng.normal(0, 3, (200, 1, 8, 8)), 0, 255).astype(np.float32)
    m = memorisation(copies / 255, train / 255.0, test / 255.0)
    assert m["share"] > 0.95
    assert m["nn_index"].tolist() == list(range(200))
    held = memorisation(test / 255.0, train / 255.0, test / 255.0)["share"]
    assert held < 0.03  # 0.01 by construction of the threshold


# ---------------------------------------------------------------- classifier features


@pytest.fixture(scope="module")
def classifier(digits_u8, tmp_path_factory):
    from metrics.features import classifier_features

    d, train, test = digits_u8
    cache = tmp_path_factory.mktemp("features")
    with log_lines() as lines:
        f = classifier_features(
            train, d.labels["train"].numpy(), test, d.labels["test"].numpy(), cache
        )
    return f, cache, lines


def test_classifier_is_accurate_and_cached(digits_u8, classifier):
    d, train, test = digits_u8
    feats, cache, lines = classifier
    assert feats.accuracy >= 0.93  # measured 0.967 on the 180 test digits
    files = list(cache.glob("classifier-*.pt"))
    assert len(files) == 1 and any("trained" in ln for ln in lines)
    # loaded, not retrained, the second time; same features
    from metrics.features import classifier_features

    with log_lines() as again:
        f2 = classifier_features(
            train, d.labels["train"].numpy(), test, d.labels["test"].numpy(), cache
        )
    assert again == [] and f2.accuracy == feats.accuracy
    assert torch.equal(f2(test[:10]), feats(test[:10]))
    assert feats(test[:3]).shape == (3, 128)


def test_degraded_digits_have_a_higher_fid(digits_u8, classifier):
    _, train, test = digits_u8
    feats = classifier[0]
    f_train, f_test = feats(train), feats(test)
    x = test.astype(np.float64)
    blurred = x + np.roll(x, 1, -1) + np.roll(x, -1, -1) + np.roll(x, 1, -2) + np.roll(x, -1, -2)
    blurred = np.round(blurred / 5).astype(np.uint8)
    rng = np.random.default_rng(0)
    noisy = np.clip(x + rng.normal(0, 60, x.shape), 0, 255).astype(np.uint8)
    clean = fid_from_features(f_test, f_train)
    assert fid_from_features(feats(blurred), f_train) > 2 * clean
    assert fid_from_features(feats(noisy), f_train) > 2 * clean


# ---------------------------------------------------------------- Inception-v3 loading path


class _NotWeights:  # a pickled object that a weights_only load must refuse
    pass


def test_inception_architecture_and_loading(tmp_path):
    from metrics.inception import FIDInceptionV3, InceptionWeightsError, load_fid_inception

    torch.manual_seed(0)
    net = FIDInceptionV3()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    good = tmp_path / "w.pth"
    torch.save(state, good)
    loaded = load_fid_inception(good)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        f = loaded(x)
        assert f.shape == (2, 2048) and torch.allclose(f, net.eval()(x), atol=1e-5)
        assert loaded(torch.rand(1, 1, 28, 28)).shape == (1, 2048)  # grey images repeated
    assert sum(p.numel() for p in net.parameters()) == 23_850_960  # FID Inception-v3, 1008 classes
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a weights file at all")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    shape = tmp_path / "shape.pth"
    torch.save({**state, "Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, shape)
    pickled = tmp_path / "obj.pth"
    torch.save({"x": _NotWeights()}, pickled)
    for p, what in (
        (bad, "not a readable"),
        (wrong, "tensors missing"),
        (shape, "has shape"),
        (pickled, "not a readable"),
    ):
        with pytest.raises(InceptionWeightsError, match=what) as e:
            load_fid_inception(p)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------- mode=eval end to end


def _write_samples(path, raw):
    np.savez(path, samples=raw, samples_model_space=raw)


@pytest.mark.slow  # 10-20 s: too long for the default run (CI runs -m slow too)
def test_mode_eval_on_test_digits_and_a_sample_run(tmp_path, digits_u8):
    from runs import run_mode

    d = digits_u8[0]
    # the test split itself as "samples" (raw range 0..16): FID 0, full precision and recall
    npz = tmp_path / "test_digits.npz"
    _write_samples(npz, d.inverse_scaler(d.test).numpy())
    m, out = run_mode(
        tmp_path, "ev_test", "mode=eval", "data=digits", f"eval.path={npz}", "eval.export_png=true"
    )
    assert m["features"] == "classifier" and m["feature_accuracy"] >= 0.93
    assert m["fid"] < 1e-6 and m["precision"] == 1 and m["recall"] == 1
    assert m["fid_floor_test_vs_train"] > 1 and m["memorisation_share"] < 0.05
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["fid"] == m["fid"] and saved["n_samples"] == 180
    assert (out / "nearest_train.png").is_file() and (out / "samples.png").is_file()
    pngs = sorted((out / "samples_png").glob("*.png"))
    assert len(pngs) == 180
    # the PNG folder scores exactly as the npz it came from
    m2, _ = run_mode(
        tmp_path, "ev_png", "mode=eval", "data=digits", f"eval.path={out / 'samples_png'}"
    )
    assert m2["fid"] == pytest.approx(m["fid"], abs=1e-9) and m2["kid"] == m["kid"]
    # two seeds on subsets: mean and min reported
    m3, _ = run_mode(
        tmp_path,
        "ev_seeds",
        "mode=eval",
        "data=digits",
        f"eval.path={npz}",
        "eval.n_samples=100",
        "eval.seeds=[0,1]",
    )
    assert m3["n_samples"] == 100 and len(m3["per_seed"]) == 2
    assert m3["fid_min"] <= m3["fid_mean"] and m3["fid"] == m3["fid_mean"]
    # a sample run's samples.npz, found as the newest sample run when eval.path is unset
    unet = ("data=digits", "model=unet", "model.ch=8")
    run_mode(tmp_path, "tiny", *unet, "training.steps=3", "training.batch_size=8")
    _, s_out = run_mode(
        tmp_path,
        "s",
        "mode=sample",
        *unet,
        "sampler=fast",
        "sampler.grid=null",
        "sampler.n_samples=40",
    )
    m4, _ = run_mode(tmp_path, "ev_s", "mode=eval", *unet)
    assert m4["source"] == str(s_out / "samples.npz") and m4["n_samples"] == 40
    assert m4["fid"] > 10 * m["fid_floor_test_vs_train"]  # an untrained model is far off


def _rgb_folder(root, n=60, size=8):
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            root / f"{i:03d}.png"
        )
    return root


def test_mode_eval_rgb_without_and_with_bad_inception_weights(tmp_path):
    from runs import compose_cfg

    from tasks import dispatch
    from tasks.common import UserError

    folder = _rgb_folder(tmp_path / "rgb")
    base = (
        "mode=eval",
        "data=folder",
        f"data.path={folder}",
        "data.channels=3",
        f"eval.path={folder}",
    )
    out = tmp_path / "o1"
    out.mkdir()
    with log_lines() as lines:
        m = dispatch(compose_cfg(tmp_path, *base), out)
    assert m["features"] == "pixels" and m["fid"] is None and 0 <= m["kid_std"]
    missing = [ln for ln in lines if "Inception-v3 weights" in ln]
    assert len(missing) == 1 and "pt_inception-2015-12-05-6726825d.pth" in missing[0]
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError, match="eval.inception_weights") as e:
        dispatch(compose_cfg(tmp_path, *base, f"eval.inception_weights={corrupt}"), out)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="eval.features"):
        dispatch(compose_cfg(tmp_path, *base, "eval.features=classifier"), out)
    with pytest.raises(UserError, match="eval.seeds"):
        dispatch(compose_cfg(tmp_path, *base, "eval.seeds=[]"), out)


def test_user_feature_module(tmp_path, monkeypatch):
    from metrics.features import user_features

    mod = tmp_path / "my_feats.py"
    mod.write_text("def make():\n    return lambda x: x.mean(dim=(2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = user_features("my_feats:make")
    assert f(np.full((3, 3, 4, 4), 255, np.uint8)).tolist() == [[1.0] * 3] * 3
    from tasks.common import UserError

    with pytest.raises(UserError, match="has no callable"):
        user_features("my_feats:nothing")


def test_grid_is_upscaled(tmp_path):
    from PIL import Image

    from tasks.figures import image_grid

    image_grid(np.zeros((4, 1, 8, 8), np.uint8), tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").size[0] >= 2 * 64
