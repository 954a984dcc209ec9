"""training.data.BatchPlan: epochs without replacement, the same global batch and per-example
noise for any world size and micro-batch size, DataLoader workers, per-example flips."""

from __future__ import annotations

import pytest
import torch

from data.datasets import digits, toy
from training.data import BatchPlan


@pytest.fixture(scope="module")
def ds():
    return digits(17)


def test_each_epoch_reads_every_training_example_once(ds):
    n = ds.train.shape[0]
    plan = BatchPlan(ds, 100, seed=3)
    idx = torch.cat([plan.global_indices(k) for k in range(3 * n // 100 + 1)])
    for e in range(3):
        assert torch.equal(idx[e * n : (e + 1) * n].sort().values, torch.arange(n))
    assert not torch.equal(idx[:n], idx[n : 2 * n])  # a fresh permutation per epoch


@pytest.mark.parametrize("world,per_device", [(2, None), (4, 7), (3, 1)])
def test_ranks_split_the_same_global_batch_and_noise(ds, world, per_device):
    one = BatchPlan(ds, 24, seed=0, random_flip=True)
    for step in (0, 5, 70):  # 70: past the first epoch
        x_one, n_one = one.micro_batches(step, one.local_batch(step), "cpu")[0]
        z_one = n_one.randn(x_one.shape)
        xs, zs = [], []
        for r in range(world):
            plan = BatchPlan(
                ds, 24, 0, rank=r, world_size=world, batch_per_device=per_device, random_flip=True
            )
            for x0, noise in plan.micro_batches(step, plan.local_batch(step), "cpu"):
                xs.append(x0)
                zs.append(noise.randn(x0.shape))
        assert torch.equal(torch.cat(xs), x_one) and torch.equal(torch.cat(zs), z_one)


def test_indivisible_global_batch_is_refused(ds):
    with pytest.raises(ValueError, match="not divisible by the 5 processes"):
        BatchPlan(ds, 24, 0, rank=0, world_size=5)


def test_workers_prepare_the_same_batches_in_order():
    for data in (digits(17), toy("moons")):
        plan = BatchPlan(data, 32, seed=1)
        ahead = list(plan.local_batches(3, 12, workers=2))
        assert len(ahead) == 9
        for k, x in zip(range(3, 12), ahead):
            assert torch.equal(x, plan.local_batch(k))


def test_random_flip_flips_about_half_of_the_examples_per_example(ds):
    plan = BatchPlan(ds, 1000, seed=0, random_flip=True)
    raw = plan.local_batch(0)
    x0, _ = plan.micro_batches(0, raw, "cpu")[0]
    flipped = (x0 == raw.flip(-1)).flatten(1).all(1) & ~(x0 == raw).flatten(1).all(1)
    kept = (x0 == raw).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 0.45 < float(flipped.float().mean()) < 0.55
