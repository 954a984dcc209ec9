"""mode=sample on image data scores its samples (FID and co. with the classifier features):
a better-trained model gets a lower FID than an undertrained one."""

from __future__ import annotations

import json
import math

import pytest
from runs import run_mode

TINY_UNET = (
    "data=digits",
    "model=unet",
    "model.ch=8",
    "training.batch_size=64",
    "training.warmup=20",
    "training.log_every=20",
)


@pytest.mark.slow
def test_better_trained_digits_model_has_lower_fid(tmp_path):
    """Slow (two U-Net trainings, 15 and 500 steps, and two sample runs; ~35 s of CPU). In the
    default run the image metrics of mode=sample and mode=eval are checked by
    test_metrics.py::test_mode_eval_on_test_digits_and_a_sample_run, and that FID orders good
    and bad digits by test_metrics.py::test_degraded_digits_have_a_higher_fid."""
    fids = {}
    for steps in (15, 500):
        root = tmp_path / f"s{steps}"
        run_mode(root, "train", *TINY_UNET, f"training.steps={steps}")
        metrics, out = run_mode(
            root,
            "sample",
            *TINY_UNET,
            "mode=sample",
            "sampler=fast",
            "sampler.grid=null",
            "sampler.steps=19",
            "sampler.n_samples=300",
        )
        saved = json.loads((out / "metrics.json").read_text())
        for key in (
            "fid",
            "fid_floor_test_vs_train",
            "kid",
            "precision",
            "recall",
            "memorisation_share",
            "feature_accuracy",
        ):
            assert isinstance(saved[key], (int, float)) and math.isfinite(saved[key]), key
        assert saved["features"] == "classifier" and saved["feature_accuracy"] > 0.9
        assert (out / "nearest_train.png").is_file()
        fids[steps] = saved["fid"]
    # an undertrained model's samples are far from the data; training brings FID down a lot
    assert fids[500] < 0.5 * fids[15], fids
