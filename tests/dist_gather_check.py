"""Run under torchrun by tests/test_distributed.py: gather_to_main and share_from_main with tiny
pieces (CHUNK bytes), so that every share is split; each rank writes what it got to OUT/rank<r>.pt.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_gather_check.py OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.distributed import (  # noqa: E402
    gather_to_main,
    my_items,
    setup,
    share_from_main,
    teardown,
)

CHUNK = 100
N_ITEMS = 7  # rank 0 holds 4 of them, rank 1 three: shares of different sizes


def item(i: int):
    """Item i: a tensor of i rows (one of them empty), or a JSON-like value (as mode=nll sends)."""
    if i % 3 == 2:
        return {"logp": [float(i), -0.5], "mc_stderr": None, "label": f"batch {i}"}
    return torch.arange(i * 3, dtype=torch.float32).reshape(i, 3) / 7


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    info = setup("cpu")
    sizes: list[int] = []  # bytes of every message on the default group
    for name in ("send", "recv", "broadcast"):
        real = getattr(dist, name)

        def counted(tensor, *args, _real=real, **kw):
            if kw.get("group") is None:
                sizes.append(tensor.numel() * tensor.element_size())
            return _real(tensor, *args, **kw)

        setattr(dist, name, counted)
    try:
        merged = gather_to_main({i: item(i) for i in my_items(N_ITEMS, info)}, info, CHUNK)
        big = {"weights": torch.linspace(0, 1, 1000, dtype=torch.float64), "step": 7}
        shared = share_from_main(lambda: big if info.is_main else None, info, chunk_bytes=CHUNK)
        try:
            share_from_main(
                lambda: (_ for _ in ()).throw(ValueError("no checkpoint here")),
                info,
                ValueError,
                CHUNK,
            )
            error = None
        except ValueError as e:
            error = str(e)
    finally:
        teardown(info)
    torch.save(
        {"merged": merged, "shared": shared, "error": error, "sizes": sizes},
        out / f"rank{info.rank}.pt",
    )


if __name__ == "__main__":
    main()
