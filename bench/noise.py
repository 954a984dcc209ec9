"""Benchmark the per-sample keyed noise (sde_lib.noise.KeyedNoise) beside torch.randn.

    python bench/noise.py [--threads 1] [--repeats 20] [--device cpu|cuda]

For each shape (B, *D), a float32 standard normal draw of that shape:
  torch.randn     torch.randn(shape, generator=g): one stream for the whole batch
  keyed draw      KeyedNoise.randn(shape) on a source built beforehand (what a sampler pays per
                  step: the rows' keys are hashed once per batch)
  keyed + keys    KeyedNoise.for_indices(seed, arange(B)) and one draw (what a batch pays once)
Times are the fastest of --repeats calls (after one warm-up call; the fastest, as in
bench/scaling.py, since a loaded machine only adds time), in microseconds; `ratio` is
keyed draw / torch.randn and `ns/value` the keyed draw's cost per drawn value. On CUDA every
call is synchronised. Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sde_lib import KeyedNoise  # noqa: E402

SHAPES = [(256, 2), (4096, 2), (65536, 2), (16, 3, 32, 32), (128, 3, 32, 32), (64, 3, 64, 64)]


def fastest_us(fn, device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"fastest of {args.repeats}"
    )
    head = (
        f"{'shape':>16} {'values':>9} {'torch.randn us':>15} {'keyed draw us':>14} "
        f"{'keyed+keys us':>14} {'ratio':>6} {'ns/value':>9}"
    )
    print(head)
    print("-" * len(head))
    for shape in SHAPES:
        print(row(shape, device, args.repeats))


def row(shape: tuple[int, ...], device: torch.device, repeats: int) -> str:
    """One line of the table for a draw of this shape."""
    n = 1
    for s in shape:
        n *= s
    g = torch.Generator(device).manual_seed(0)
    idx = torch.arange(shape[0], device=device)
    src = KeyedNoise.for_indices(0, idx)
    t_torch = fastest_us(lambda: torch.randn(shape, generator=g, device=device), device, repeats)
    t_keyed = fastest_us(lambda: src.randn(shape, device=device), device, repeats)
    t_keys = fastest_us(
        lambda: KeyedNoise.for_indices(0, idx).randn(shape, device=device), device, repeats
    )
    return (
        f"{str(shape):>16} {n:>9} {t_torch:>15.1f} {t_keyed:>14.1f} {t_keys:>14.1f} "
        f"{t_keyed / t_torch:>6.1f} {1e3 * t_keyed / n:>9.1f}"
    )


if __name__ == "__main__":
    main()
