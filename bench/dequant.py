"""Bits/dim of a trained image model by dequantisation method: uniform and truncated normal, each
with K = 1 and K = 4 importance samples, through run.py's mode=nll (PF-ODE, per-point solves,
one Hutchinson probe per solve).

    python bench/dequant.py --ckpt digits:PATH,mnist:PATH [--points digits:100,mnist:50]
                            [--k 1,4] [--outputs-root bench_out/dequant]

Prints one markdown row per data set and method: bits/dim ± its standard error over the test
points, the evaluations per point and the seconds. Every number is an upper bound on the model's
-log2 P(k) / D of the discrete data; lower is tighter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipes import run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="data:checkpoint pairs, comma-separated")
    p.add_argument("--points", default="digits:100,mnist:50")
    p.add_argument("--k", default="1,4")
    p.add_argument("--network", default="mnist:model=unet,mnist:model.ch=16")
    p.add_argument("--outputs-root", default="bench_out/dequant")
    a = p.parse_args()
    root = Path(a.outputs_root).resolve()
    ckpts = dict(kv.split(":", 1) for kv in a.ckpt.split(","))
    points = dict(kv.split(":") for kv in a.points.split(","))
    network: dict[str, list[str]] = {}
    for kv in filter(None, a.network.split(",")):  # data:override, repeatable per data set
        name, override = kv.split(":", 1)
        network.setdefault(name, []).append(override)
    print("| data | dequantisation | K | bits/dim | evaluations / point | s |")
    print("|---|---|---|---|---|---|")
    for data, ckpt in ckpts.items():
        for kind in ("uniform", "truncated_normal"):
            for k in (int(v) for v in a.k.split(",")):
                out = root / data / f"{kind}_{k}"
                done = out / "result.json"
                if done.is_file():
                    s, seconds = json.loads(done.read_text())
                else:
                    start = time.perf_counter()
                    overrides = [
                        "mode=nll", f"data={data}", f"ckpt={ckpt}",
                        f"likelihood.n_points={points.get(data, 100)}", "likelihood.batch_size=50",
                        f"likelihood.dequantization={kind}", f"likelihood.importance_samples={k}",
                        *network.get(data, []),
                    ]  # fmt: skip
                    s = run(root / data, out, overrides)
                    seconds = time.perf_counter() - start
                    done.write_text(json.dumps([s, seconds], default=str))
                print(f"| {data} | {kind} | {k} | {s['bpd']:.3f} ± {s['bpd_stderr']:.3f} | "
                      f"{s['nfe_mean']:.0f} | {seconds:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
