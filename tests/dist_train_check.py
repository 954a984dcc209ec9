"""Run under torchrun by tests/test_distributed.py: train a small model with 2 processes and check,
after every optimiser step, that all ranks hold the same parameters; rank 0 saves the final ones.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_train_check.py OUT STEPS \
        BATCH PER_DEVICE
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from runs import compose_cfg  # noqa: E402

from tasks.common import build_dataset, build_score_model, build_sde  # noqa: E402
from training.distributed import setup, teardown  # noqa: E402
from training.loop import TrainSettings, train  # noqa: E402
from training.losses import make_loss  # noqa: E402

DATA = ("data=digits", "model=unet", "model.ch=8")


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def main() -> None:
    out, steps, batch, per_device = Path(sys.argv[1]), *map(int, sys.argv[2:5])
    torch.set_num_threads(1)
    info = setup("cpu")
    cfg = compose_cfg(out, *DATA)
    sde, ds = build_sde(cfg["sde"]), build_dataset(cfg["data"])
    model = build_score_model(cfg, sde, ds)
    worst = []

    def compare(step, m):
        mine = flat(m)
        theirs = [torch.empty_like(mine) for _ in range(info.world_size)]
        dist.all_gather(theirs, mine)
        worst.append(max(float((t - mine).abs().max()) for t in theirs))

    s = TrainSettings(
        steps=steps,
        batch_size=batch,
        lr=1e-3,
        warmup=2,
        log_every=2,
        ckpt_every=1000,
        batch_per_device=per_device,
        random_flip=True,
    )
    train(
        model,
        make_loss("dsm", sde),
        ds,
        s,
        out / "run",
        config=cfg,
        dist_info=info,
        progress=False,
        callback=compare,
    )
    if info.is_main:
        torch.save({"params": flat(model), "worst": torch.tensor(worst)}, out / "dist.pt")
    teardown(info)


if __name__ == "__main__":
    main()
