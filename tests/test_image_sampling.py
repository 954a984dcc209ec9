"""mode=sample on image data scores its samples (FID and co. with the classifier features):
a better-trained model gets a lower FID than an undertrained one."""

from __future__ import annotations

import json

from runs import run_mode

TINY_UNET = (
    "data=digits",
    "model=unet",
    "model.ch=8",
    "training.batch_size=64",
    "training.warmup=20",
    "training.log_every=20",
)


def test_better_trained_digits_model_has_lower_fid(tmp_path):
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
            assert saved[key] is not None, key
        assert saved["features"] == "classifier" and saved["feature_accuracy"] > 0.9
        assert (out / "nearest_train.png").is_file()
        fids[steps] = saved["fid"]
    # an undertrained model's samples are far from the data; training brings FID down a lot
    assert fids[500] < 0.5 * fids[15], fids
