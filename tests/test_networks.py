"""The papers' networks: NCSN++ / DDPM++ / DDPM against score_sde_pytorch's own outputs, the
presets' parameter counts, released checkpoints (score_sde_pytorch, diffusers) through the Python
API and run.py, and their bad input.

Fixtures (data written by the reference code; tests/fixtures/peer_refs/README.md): checkpoints
after two real training steps with inputs, network outputs and scores at five times; and
tests/fixtures/score_sde_layouts/, score_sde's NCSN++ / DDPM code run on other layouts (output
and input pyramids with sum and cat, residual pyramids with FIR, DDPM blocks with and without
resampling convolutions, the CelebA-HQ layout on 64x64, one channel on 8x8, the DDPM network)
with random weights, in float64.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import factory, pretrained
from models.ncsnpp import NCSNpp
from models.resample import conv_downsample_2d, downsample_2d, upsample_2d, upsample_conv_2d
from models.score import ScoreSDEModel
from sde_lib import VESDE, VPSDE, subVPSDE
from sde_lib.errors import UserError
from tests.cifar_archive import make_cifar_archive
from tests.runs import run_mode

FIXTURES = Path(__file__).parent / "fixtures"
PEER = FIXTURES / "peer_refs"
SHRINK = ("model.nf=8", "model.num_res_blocks=1", "model.attn_resolutions=[8]")
SHRINK16 = (*SHRINK, "data.image_size=16")
TOL = 1e-5  # relative, float32 (the parity bar)

# preset -> parameters of score_sde's own network for that config (counted by instantiating it)
PARAMETERS = {
    "cifar10_ddpmpp_cont_vp": 61_804_419,
    "cifar10_ddpmpp_cont_subvp": 61_804_419,
    "cifar10_ddpmpp_deep_cont_vp": 106_632_579,
    "cifar10_ddpmpp_deep_cont_subvp": 106_632_579,
    "cifar10_ncsnpp_cont_ve": 62_758_915,
    "cifar10_ncsnpp_deep_cont_ve": 107_587_075,
    "cifar10_ddpm_cont_vp": 35_218_947,
    "cifar10_ddpm_cont_subvp": 35_218_947,
    "celebahq256_ncsnpp_cont_ve": 65_574_549,
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-example relative error max|a - b| / max|b| (scores span 1e-2 .. 1e6)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(((a - b).abs().amax(1) / b.abs().amax(1)).max())


def test_every_preset_is_listed_and_has_the_reference_parameter_count():
    names = pretrained.preset_names()
    assert sorted(PARAMETERS) == names
    for name, cfg in zip(names, pretrained.compose_many(names, ["data.path=unused"])):
        want = PARAMETERS[name]
        with torch.device("meta"):
            net = factory.network(cfg["model"], pretrained.image_shape(cfg["data"]), "images")
        assert sum(p.numel() for p in net.parameters()) == want, name
        frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
        assert frozen == (128 if cfg["model"]["embedding_type"] == "fourier" else 0), name


@pytest.mark.parametrize("use_ema", [True, False])
def test_score_sde_ddpmpp_checkpoint_reproduces_the_reference_scores(use_ema):
    """VP, sub-VP and discrete VP rules on one DDPM++ checkpoint, at t = 1e-5 .. 1."""
    ref = np.load(PEER / "ssp_ddpmpp_vp" / "ref.npz")
    tag = "ema" if use_ema else "model"
    x, t = torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"])
    model, sde = pretrained.load_pretrained(
        PEER / "ssp_ddpmpp_vp" / "checkpoint_1.pth",
        "cifar10_ddpmpp_cont_vp",
        SHRINK16,
        use_ema=use_ema,
    )
    assert isinstance(sde, VPSDE)
    with torch.no_grad():
        out = model.net(x, torch.from_numpy(ref["labels_vp"]))
        assert rel(out, torch.from_numpy(ref[f"net_out_vp_{tag}"])) < TOL
        assert rel(model(x, t), torch.from_numpy(ref[f"score_vp_{tag}"])) < TOL
        subvp = ScoreSDEModel(model.net, subVPSDE(), "subvp")
        assert rel(subvp(x, t), torch.from_numpy(ref[f"score_subvp_{tag}"])) < TOL
        discrete = ScoreSDEModel(model.net, sde, "vp", continuous=False)
        assert rel(discrete(x, t), torch.from_numpy(ref[f"score_vp_discrete_{tag}"])) < TOL
    # EMA and raw weights differ, so the comparison above could tell them apart
    assert (
        rel(torch.from_numpy(ref["net_out_vp_ema"]), torch.from_numpy(ref["net_out_vp_model"]))
        > 0.01
    )


@pytest.mark.parametrize("use_ema", [True, False])
def test_score_sde_ncsnpp_ve_checkpoint_in_the_toolkits_data_range(use_ema):
    """NCSN++ trained on [0, 1] data: in [-1, 1] coordinates x' = 2x - 1 its score is half the
    reference's and its sigmas double (sde.sigma_min = 0.02, sigma_max = 100)."""
    ref = np.load(PEER / "ssp_ncsnpp_ve" / "ref.npz")
    tag = "ema" if use_ema else "model"
    x, t = torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"])
    model, sde = pretrained.load_pretrained(
        PEER / "ssp_ncsnpp_ve" / "checkpoint_1.pth",
        "cifar10_ncsnpp_cont_ve",
        SHRINK16,
        use_ema=use_ema,
    )
    assert isinstance(sde, VESDE) and (sde.sigma_min, sde.sigma_max) == (0.02, 100.0)
    with torch.no_grad():
        assert rel(2 * model(2 * x - 1, t), torch.from_numpy(ref[f"score_ve_{tag}"])) < TOL
        labels = torch.from_numpy(ref["labels_ve"])
        out = model.net(2 * x - 1, labels) / labels[:, None, None, None]
        assert rel(out, torch.from_numpy(ref[f"net_out_ve_{tag}"])) < TOL


def test_frozen_fourier_weights_come_from_the_model_not_the_ema():
    ckpt = pretrained.read_score_sde(PEER / "ssp_ncsnpp_ve" / "checkpoint_1.pth")
    net = NCSNpp((3, 16, 16), nf=8, num_res_blocks=1, attn_resolutions=(8,), fir=True,
                 progressive_input="residual", embedding_type="fourier")  # fmt: skip
    weights = pretrained.score_sde_weights(ckpt, net, use_ema=True)
    assert torch.equal(weights["fourier.w"], ckpt["model"]["all_modules.0.W"])
    assert len(ckpt["shadow"]) == sum(p.requires_grad for p in net.parameters())


LAYOUTS = sorted((FIXTURES / "score_sde_layouts").glob("*.npz"))


@pytest.mark.parametrize("path", LAYOUTS, ids=[p.stem for p in LAYOUTS])
def test_other_layouts_match_score_sdes_own_network(path):
    """Each fixture: score_sde's code with random weights; the same tensors loaded strictly here
    give the same output (float64, 1e-6 relative)."""
    ref = np.load(path)
    c = json.loads(str(ref["config_json"]))
    m, d = c["model"], c["data"]
    model_cfg = {k: m[k] for k in factory.NCSNPP_KEYS if k in m}
    model_cfg["name"] = m["name"]
    if m["name"] == "ddpm":  # score_sde's DDPM network: these are its fixed settings
        model_cfg.update(resblock_type="ddpm", skip_rescale=False, norm_groups=32,
                         embedding_type="positional", init_scale=0.0)  # fmt: skip
    shape = (d["num_channels"], d["image_size"], d["image_size"])
    net = factory.network(model_cfg, shape, "images").double().eval()
    state = {"model": {str(k): torch.from_numpy(ref[f"sd/{k}"]) for k in ref["keys"]}}
    net.load_state_dict(pretrained.score_sde_weights(state, net, use_ema=False))
    x = torch.from_numpy(ref["x"]).double()
    if not d["centered"]:  # score_sde's networks map [0, 1] data to 2x - 1 as their first step
        x = 2 * x - 1
    labels = torch.from_numpy(ref["labels"]).double()
    with torch.no_grad():
        out = net(x, labels)
    if m.get("scale_by_sigma"):
        out = out / labels[:, None, None, None]
    assert rel(out, torch.from_numpy(ref["out"])) < 1e-6


def test_fir_resampling_keeps_constants_and_is_twice_differentiable():
    x = torch.full((1, 2, 8, 8), 3.0, dtype=torch.float64)
    k = (1, 3, 3, 1)
    assert torch.allclose(upsample_2d(x, k)[..., 2:-2, 2:-2], x.new_tensor(3.0))
    assert torch.allclose(downsample_2d(x, k)[..., 1:-1, 1:-1], x.new_tensor(3.0))
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert upsample_conv_2d(x, w, k).shape == (1, 3, 16, 16)
    assert conv_downsample_2d(x, w, k).shape == (1, 3, 4, 4)
    # the fused forms are resample-then-convolve (up) and convolve-then-resample (down), away
    # from the border where their single padding differs
    from torch.nn.functional import conv2d

    a = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    fused, plain = upsample_conv_2d(a, w, k), conv2d(upsample_2d(a, k), w, padding=1)
    assert torch.allclose(fused[..., 3:-3, 3:-3], plain[..., 3:-3, 3:-3])
    fused, plain = conv_downsample_2d(a, w, k), downsample_2d(conv2d(a, w, padding=1), k)
    assert torch.allclose(fused[..., 1:-1, 1:-1], plain[..., 1:-1, 1:-1])
    z = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v: downsample_2d(upsample_2d(v, k), k), (z,))


def test_diffusers_ddpm_folder_reproduces_diffusers_scores():
    pytest.importorskip("diffusers")
    ref = np.load(PEER / "diffusers_ddpm" / "ref.npz")
    model, sde = pretrained.load_pretrained(PEER / "diffusers_ddpm")
    assert (sde.beta_min, sde.beta_max) == pytest.approx((0.1, 20.0))
    x = torch.from_numpy(ref["x"])
    n = torch.from_numpy(ref["timesteps"]).double()
    with torch.no_grad():  # at t = n / (N - 1) the discrete convention is diffusers' own rule
        assert rel(model(x, (n / 999).float()), torch.from_numpy(ref["score"])) < TOL
        t = torch.from_numpy(ref["t"])
        cont = ScoreSDEModel(model.net, sde, "vp")
        assert rel(cont(x, t), torch.from_numpy(ref["score_vp_continuous"])) < TOL


def test_diffusers_folder_without_the_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(UserError) as e:
        pretrained.load_pretrained(PEER / "diffusers_ddpm")
    assert 'pip install -e ".[diffusers]"' in str(e.value) and "\n" not in str(e.value)


def test_bad_checkpoints_are_one_line_and_never_run_code(tmp_path):
    good = PEER / "ssp_ddpmpp_vp" / "checkpoint_1.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    code = tmp_path / "code.pth"
    torch.save({"model": {}, "ema": Exploit(), "step": 1}, code)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(Exploit()))
    for path, words in (
        (truncated, "truncated"),
        (code, "could run code"),
        (plain, "nothing in the file is run"),
    ):
        with pytest.raises(UserError) as e:
            pretrained.load_pretrained(path, "cifar10_ddpmpp_cont_vp", SHRINK16)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not marker.exists()
    # the keys fit no network of the named preset: the presets whose shapes fit are named
    with pytest.raises(pretrained.LayoutMismatch) as e:
        pretrained.load_pretrained(good, "cifar10_ncsnpp_cont_ve", SHRINK16)
    message = str(e.value)
    assert "presets whose shapes fit: cifar10_ddpmpp_cont_subvp, cifar10_ddpmpp_cont_vp" in message
    assert "ncsnpp_cont_ve," not in message and "\n" not in message
    with pytest.raises(UserError, match="name its preset with experiment="):
        pretrained.load_pretrained(good, None, SHRINK16)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return make_cifar_archive(tmp_path_factory.mktemp("cifar"), version="binary", per_batch=8)


def _preset_runs(root: Path, preset: str, cifar: Path) -> None:
    """Train a tiny-width preset for 2 steps, then sample and evaluate log p on its checkpoint."""
    data = "data.path=" + str(cifar) if "cifar10" in preset else f"data.path={cifar.parent}/img"
    tiny = [f"+experiment={preset}", data, "model.nf=8", "model.num_res_blocks=1",
            "model.attn_resolutions=[4]", "training.batch_size=2", "training.steps=2"]  # fmt: skip
    if preset.startswith("celebahq"):
        tiny += ["data.image_size=64"]
    else:
        tiny += ["data.image_size=16"]
    if "ddpm_cont" in preset:  # 32 GroupNorm groups: the DDPM network's width is a multiple of 32
        tiny[2] = "model.nf=32"
    summary, _ = run_mode(root, "train", *tiny)
    assert summary["status"] == "finished" and summary["step"] == 2
    sample = ["sampler.steps=3", "sampler.n_samples=4", "sampler.batch_size=4"]
    result, out = run_mode(root, "sample", "mode=sample", *tiny, *sample)
    x = np.load(out / "samples.npz")["samples"]
    assert x.shape[0] == 4 and np.isfinite(x).all()
    nll = ["likelihood.n_points=2", "likelihood.rtol=1e-2", "likelihood.atol=1e-2"]
    result, _ = run_mode(root, "nll", "mode=nll", *tiny, *nll)
    assert np.isfinite(result["bpd"])


def _image_folder(root: Path) -> None:
    from PIL import Image

    (root / "img").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(50):  # a 10 % test split of 5: the image metrics' minimum
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            root / "img" / f"{i}.png"
        )


FAST_PRESETS = ("cifar10_ncsnpp_cont_ve",)  # the others (same code paths) in the slow run


@pytest.mark.parametrize(
    "preset",
    [p if p in FAST_PRESETS else pytest.param(p, marks=pytest.mark.slow) for p in PARAMETERS],
)
def test_each_preset_trains_samples_and_evaluates_at_tiny_width(tmp_path, cifar, preset):
    _image_folder(cifar.parent)
    _preset_runs(tmp_path, preset, cifar)


def test_released_checkpoint_through_run_py_config_and_fine_tuning(tmp_path, cifar):
    """ckpt=<score_sde file> with the preset named samples; training.init_from starts from it."""
    common = ("+experiment=cifar10_ddpmpp_cont_vp", f"data.path={cifar}", *SHRINK16)
    ckpt = PEER / "ssp_ddpmpp_vp" / "checkpoint_1.pth"
    sample = ("sampler.steps=3", "sampler.n_samples=4", "sampler.batch_size=4")
    _, out = run_mode(tmp_path, "s", "mode=sample", f"ckpt={ckpt}", *common, *sample)
    assert np.isfinite(np.load(out / "samples.npz")["samples"]).all()
    tune = (f"training.init_from={ckpt}", "training.steps=1", "training.batch_size=2")
    summary, out = run_mode(tmp_path, "t", *common, *tune, "training.lr=1e-12")
    state = torch.load(summary["checkpoint"], weights_only=True)
    loaded, _ = pretrained.load_pretrained(ckpt, "cifar10_ddpmpp_cont_vp", SHRINK16)
    for k, v in loaded.state_dict().items():  # lr ~ 0: the weights are still the released ones
        assert torch.allclose(state["model"][k], v, atol=1e-6), k
    with pytest.raises(UserError, match="presets whose shapes fit"):
        run_mode(tmp_path, "bad", "mode=sample", f"ckpt={ckpt}", *common[:2], "model.nf=8",
                 "data.image_size=16", *sample)  # fmt: skip


def test_bad_released_checkpoints_through_the_modes_are_one_line(tmp_path, cifar):
    """ckpt= a truncated file, a pickle that would run code, a folder that is not diffusers':
    one UserError line each (run.py prints it and exits 2), and the code never runs."""
    good = PEER / "ssp_ddpmpp_vp" / "checkpoint_1.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:100_000])
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    code = tmp_path / "code.pth"
    torch.save({"model": Exploit(), "ema": {}, "step": 1}, code)
    common = ("mode=sample", "+experiment=cifar10_ddpmpp_cont_vp", f"data.path={cifar}", *SHRINK16)
    cases = ((truncated, "truncated"), (code, "could run code"), (tmp_path, "not a diffusers"))
    for ckpt, words in cases:
        with pytest.raises(UserError) as e:
            run_mode(tmp_path, "bad", *common, f"ckpt={ckpt}")
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not marker.exists()


def test_run_py_without_the_diffusers_extra_exits_2_in_one_line(tmp_path, cifar):
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    hide = "import sys; sys.modules.update(diffusers=None, safetensors=None); import runpy; "
    argv = ["run.py", "mode=sample", f"ckpt={PEER / 'diffusers_ddpm'}", "data=cifar10",
            f"data.path={cifar}", "data.image_size=16", f"outputs_root={tmp_path}"]  # fmt: skip
    code = hide + f"sys.argv = {argv!r}; runpy.run_path('run.py', run_name='__main__')"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"},
    )  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and 'pip install -e ".[diffusers]"' in lines[0]


def test_diffusers_ve_folder_is_the_pipelines_score_in_the_toolkits_range(tmp_path):
    """A score_sde VE model as diffusers ships it (Fourier UNet2DModel + ScoreSdeVeScheduler):
    its pipeline samples in [0, 1] and takes unet(x, sigma) as the score; in [-1, 1] the sigmas
    double and the score halves."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), time_embedding_type="fourier",
    )  # fmt: skip
    for p in unet.parameters():  # non-zero everywhere, so that every path matters
        p.data.normal_(0, 0.05)
    pipe = diffusers.ScoreSdeVePipeline(unet, diffusers.ScoreSdeVeScheduler(sigma_max=50.0))
    pipe.save_pretrained(tmp_path)
    model, sde = pretrained.load_pretrained(tmp_path)
    assert (sde.sigma_min, sde.sigma_max) == (0.02, 100.0)
    x = torch.rand(3, 3, 8, 8)  # the pipeline's [0, 1] data
    t = torch.tensor([1e-3, 0.4, 1.0])
    sigma = 0.01 * (50.0 / 0.01) ** t
    with torch.no_grad():
        want = unet(x, sigma).sample / 2  # d/dx' = 1/2 d/dx for x' = 2x - 1
        assert rel(model(2 * x - 1, t), want) < TOL


EDM = PEER / "edm_ddpmpp_vp"


def test_edm_snapshot_reproduces_edms_denoiser_and_score_without_running_its_code():
    """The code-free snapshot (EDM's own tensors, VPPrecond around SongUNet's DDPM++) loads onto
    NCSNpp: F and D = x - sigma F in EDM's coordinates, and the VP score in the SDE's own."""
    ref = np.load(EDM / "ref.npz")
    model, sde = pretrained.load_pretrained(EDM / "snapshot-nocode.pickle")
    assert isinstance(sde, VPSDE) and (sde.beta_min, sde.beta_max) == (0.1, 20.0)
    x, sigma = torch.from_numpy(ref["x"]), torch.from_numpy(ref["sigma"])
    c_in = (sigma**2 + 1).rsqrt()[:, None, None, None]
    with torch.no_grad():
        out = model.net(c_in * x, torch.from_numpy(ref["c_noise"]))
        assert rel(out, torch.from_numpy(ref["net_out_F"])) < TOL
        denoised = x - sigma[:, None, None, None] * out
        assert rel(denoised, torch.from_numpy(ref["denoised_D"])) < TOL
        x_vp, t = torch.from_numpy(ref["x_vp"]), torch.from_numpy(ref["t"])
        score = model(x_vp, t)
        exact = model.double()(x_vp.double(), t.double())
    # EDM forms its score as (D - x) / sigma^2 in float32, which at t = 1e-5 (sigma = 1e-3)
    # cancels to 4e-5 of the value; here the score comes from F directly: within 1e-6 of the
    # same model in float64 everywhere, and of EDM's own figure wherever it has the digits
    want = torch.from_numpy(ref["score_vp_sde"])
    assert rel(score[1:], want[1:]) < TOL and rel(score[:1], want[:1]) < 1e-4
    assert rel(score, exact) < TOL


def test_a_snapshot_with_any_other_global_is_refused_and_never_run(tmp_path, cifar):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "network-snapshot-000000.pkl"
    bad.write_bytes(pickle.dumps({"ema": Exploit()}, protocol=4))
    with pytest.raises(UserError) as e:
        pretrained.load_pretrained(bad)
    assert "global posix.system" in str(e.value) or "global os.system" in str(e.value)
    assert "\n" not in str(e.value) and not marker.exists()
    common = ("mode=sample", "data=cifar10", f"data.path={cifar}", "data.image_size=16")
    with pytest.raises(UserError, match="nothing in the file is run"):
        run_mode(tmp_path, "bad", *common, f"ckpt={bad}")
    assert not marker.exists()
    # through run.py: the snapshot's own configuration, sampled and scored
    sample = ("sampler=ddim", "sampler.steps=3", "sampler.n_samples=4", "sampler.batch_size=4")
    _, out = run_mode(tmp_path, "edm", *common, f"ckpt={EDM / 'snapshot-nocode.pickle'}", *sample)
    assert np.isfinite(np.load(out / "samples.npz")["samples"]).all()


@pytest.mark.parametrize("process", ["vp", "subvp", "ve"])
def test_edm_preconditioning_of_the_exact_denoiser_is_the_exact_score(process):
    """The network F that makes EDM's D the exact mixture denoiser, wrapped by EDMPrecondModel
    on any linear SDE (x~ = x_t / alpha, s = sigma / alpha), gives the exact score (float64)."""
    from data import gmm8
    from models import MixtureScore
    from models.score import EDMPrecondModel

    law, sd = gmm8(), 0.5
    sde = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE(0.002, 80.0)}[process]

    class ExactF(torch.nn.Module):
        def forward(self, inp, c_noise):
            s = append(torch.exp(4 * c_noise))
            k = s.square() + sd**2
            xs = inp * k.sqrt()  # x~ = inp / c_in
            # F = (D - c_skip x~) / c_out with D = x~ + s^2 score(x~; s), without cancellation
            score = law.score_at(xs, torch.ones_like(c_noise), s.flatten())
            return s * k.sqrt() / sd * (xs / k + score)

    def append(v):
        return v[:, None]

    model = EDMPrecondModel(ExactF(), sde, sd)
    exact = MixtureScore(sde, law)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    x = torch.randn(5, 2, generator=g, dtype=torch.float64) * 2
    got, want = model(x, t), exact(x, t)
    assert rel(got, want) < 1e-10


def test_discrete_conventions_use_the_tables_the_networks_were_trained_on():
    """VE discrete: level index round((1 - t)(N - 1)) of the geometric table from sigma_max down;
    VP discrete: sqrt(1 - alphabar) at floor((N - 1) t) of DDPM's beta table. On the grid they are
    the continuous conventions' levels; in [-1, 1] the VE sigmas are twice the network's."""

    class Echo(torch.nn.Module):  # returns its label, so the wrapper's arithmetic shows
        def forward(self, x, label):
            return torch.ones_like(x) * label[:, None, None, None]

    n, ve = 1000, VESDE(0.02, 100.0)
    t = torch.tensor([0.0, 0.25, 0.6, 0.9], dtype=torch.float64)
    i = torch.round((1 - t) * (n - 1))
    x = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    discrete = ScoreSDEModel(
        Echo(), ve, "ve", continuous=False, centered=False, scale_by_sigma=True
    )
    sigma_net = 0.01 * (50.0 / 0.01) ** (1 - i / (n - 1))  # score_sde's table, on [0, 1] data
    want = i / sigma_net / 2  # label / sigma, halved in [-1, 1]
    assert rel(discrete(x, t), want[:, None, None, None].expand_as(x)) < 1e-12
    vp = VPSDE()
    betas = torch.linspace(0.1 / n, 20.0 / n, n, dtype=torch.float64)
    std = torch.sqrt(1 - torch.cumprod(1 - betas, 0))
    t = torch.tensor([0.01, 0.3, 0.77, 1.0], dtype=torch.float64)
    model = ScoreSDEModel(Echo(), vp, "vp", continuous=False)
    want = -(t * (n - 1)) / std[(t * (n - 1)).long()]
    assert rel(model(x, t)[:, :1, :1, :1].flatten()[:, None], want[:, None]) < 1e-12


@pytest.mark.parametrize("parameterisation", ["eps", "score", "x0", "v", "flow"])
@pytest.mark.parametrize("process", ["vp", "subvp", "ve"])
def test_every_parameterisation_of_the_exact_denoiser_is_the_exact_score(parameterisation, process):
    """A network that predicts exactly what its parameterisation names (from the mixture's exact
    score; the path's rates by autograd, not by the wrapper's formula) gives the exact score."""
    from data import gmm8
    from models import MixtureScore, ScoreModel

    law = gmm8()
    sde = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE(0.01, 50.0)}[process]
    exact = MixtureScore(sde, law)

    class Exact(torch.nn.Module):
        def forward(self, inp, t):
            alpha, sigma = sde.alpha_sigma(t)
            a, s = alpha[:, None], sigma[:, None]
            x = inp * (a.square() * 0.25 + s.square()).sqrt()  # undo c_in (sigma_data 0.5)
            score = exact(x, t)
            z, x0 = -s * score, (x + s.square() * score) / a
            if parameterisation == "eps":
                return z
            if parameterisation == "score":
                return score
            if parameterisation == "x0":
                return x0
            if parameterisation == "v":
                return a * z - s * x0
            da, ds = torch.func.jacfwd(lambda u: torch.stack(sde.alpha_sigma(u)))(t).diagonal(
                0, 1, 2
            )
            return da[:, None] * x0 + ds[:, None] * z

    model = ScoreModel(Exact(), sde, parameterisation, sigma_data=0.5)
    # from t = 0.01: below, x0 = (x + sigma^2 score) / alpha itself loses the digits that a
    # 1e-10 comparison needs (sub-VP: sigma^2 = 1e-8 at t = 1e-3), whatever the wrapper does
    t = torch.tensor([0.01, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    assert rel(model(x, t), exact(x, t)) < 1e-10


def test_fine_tuning_starts_from_an_edm_snapshot(tmp_path, cifar):
    """training.init_from= an EDM snapshot, with the model config it describes: the run starts
    from its weights (learning rate ~0: they are unchanged after a step)."""
    snapshot = EDM / "snapshot-nocode.pickle"
    run = ("sde=vp", "data=cifar10", f"data.path={cifar}", "data.image_size=16", "model=ncsnpp",
           "model.nf=8", "model.num_res_blocks=1", "model.attn_resolutions=[8]",
           "model.parameterisation=edm_vp", f"training.init_from={snapshot}",
           "training.steps=1", "training.batch_size=2", "training.lr=1e-12")  # fmt: skip
    summary, _ = run_mode(tmp_path, "tune", *run)
    state = torch.load(summary["checkpoint"], weights_only=True)
    loaded, _ = pretrained.load_pretrained(snapshot)
    for k, v in loaded.state_dict().items():
        assert torch.allclose(state["model"][k], v, atol=1e-6), k
