import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# The tests run many small tensor ops, for which a second intra-op thread only adds overhead
# (and, on a loaded 2-core machine, contention); training tests that want more set it themselves.
torch.set_num_threads(1)


import os  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device of the device-aware tests: SCORESDE_TEST_DEVICE (cpu unless set), so the same
    suite runs on a GPU machine with SCORESDE_TEST_DEVICE=cuda."""
    return torch.device(os.environ.get("SCORESDE_TEST_DEVICE", "cpu"))
