"""Speed and memory of the papers' networks (conf/experiment presets): one table row per preset.

    python bench/networks.py                       # CPU: batch 4 (1 at 256 x 256), fp32
    python bench/networks.py --device cuda         # + channels_last, torch.compile, bf16 rows
    python bench/networks.py --score-sde DIR       # + score_sde_pytorch's own network, same
                                                   #   weights shape, from a checkout at DIR

Per row: parameters, forward + backward time per example (median of --reps timed steps after
warm-up) and memory: on CUDA the peak allocated during the step; on CPU the tensors autograd
saves for the backward pass (the activation memory that grows with the batch). The score_sde row
times the reference implementation (its compiled CUDA ops replaced by their pure-PyTorch
fallback, as its own code does without a GPU build) as the straightforward implementation of the
same architecture; its loading needs `ml_collections` or the stand-in below.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toolkit (not in --worker)

# the keyword names of models.ncsnpp.NCSNpp (here, so that a worker needs no toolkit import)
NCSNPP_KEYS = (
    "nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "fir",
    "fir_kernel", "skip_rescale", "resblock_type", "progressive", "progressive_input",
    "progressive_combine", "embedding_type", "fourier_scale", "init_scale", "conv_size",
)  # fmt: skip


def saved_bytes(step) -> int:
    """Bytes of the tensors autograd saves during step() (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def time_step(net, x, label, reps: int, device: str, dtype=None) -> tuple[float, float]:
    """(median seconds per forward + backward, memory in bytes)."""
    cast = torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()

    def step():
        with cast:
            out = net(x, label)
        out.float().square().mean().backward()

    for _ in range(2):  # warm-up (and compilation)
        step()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    memory = torch.cuda.max_memory_allocated() if device == "cuda" else saved_bytes(step)
    return statistics.median(times), memory


def score_sde_worker(root: str, cfg_json: str, batch: int, reps: int, dev: str) -> None:
    """In a process of its own (score_sde's packages are also called models and sde_lib): time
    score_sde_pytorch's network for a preset's model config and print "seconds bytes"."""
    import json

    sys.path[0] = root
    if "ml_collections" not in sys.modules:  # score_sde only reads attributes of its config
        sys.modules["ml_collections"] = types.SimpleNamespace(ConfigDict=types.SimpleNamespace)
    from models import ddpm, ncsnpp, utils  # noqa: F401  (score_sde's own package, at root)

    cfg = json.loads(cfg_json)
    m, d = cfg["model"], cfg["data"]
    model = types.SimpleNamespace(
        **m, conditional=True, sigma_min=0.01, sigma_max=50.0, nonlinearity="swish",
        normalization="GroupNorm", attention_type="ddpm",
    )  # fmt: skip
    data = types.SimpleNamespace(image_size=d["image_size"], num_channels=3, centered=True)
    config = types.SimpleNamespace(
        model=model, data=data, training=types.SimpleNamespace(continuous=True)
    )
    net = utils.get_model(m["name"])(config).to(dev).train()
    x = torch.randn(batch, 3, d["image_size"], d["image_size"], device=dev)
    label = torch.rand(batch, device=dev) * (10.0 if m["embedding_type"] == "fourier" else 999.0)
    sec, mem = time_step(net, x, label + 0.01, reps, dev)
    print(sec, mem)


def score_sde_row(root: Path, cfg: dict, batch: int, reps: int, dev: str):
    import json
    import subprocess

    keys = (*NCSNPP_KEYS, "num_scales", "scale_by_sigma", "name")
    model = {k: cfg["model"][k] for k in keys if k in cfg["model"]}
    model["centered"] = True  # the input's range does not change the cost
    args = [str(root), json.dumps({"model": model, "data": cfg["data"]}), str(batch), str(reps)]
    run = subprocess.run(
        [sys.executable, __file__, "--worker", *args, dev], capture_output=True, text=True
    )
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  score_sde_pytorch at {root} did not run: {tail}", file=sys.stderr)
        return None
    sec, mem = run.stdout.split()[-2:]
    return float(sec), float(mem)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        root, cfg_json, batch, reps, dev = sys.argv[2:7]
        return score_sde_worker(root, cfg_json, int(batch), int(reps), dev)
    from models import factory, pretrained

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--batch", type=int, default=None, help="default: 4 on CPU, the paper's on CUDA"
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--presets", nargs="*", default=None)
    ap.add_argument("--score-sde", type=Path, default=None, help="a score_sde_pytorch checkout")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = args.device
    rows = []
    for name in args.presets or pretrained.preset_names():
        cfg = pretrained.compose(name, ["data.path=unused"])
        shape = pretrained.image_shape(cfg["data"])
        # CPU: a small batch (1 at 256 x 256, where one example is a 64-fold 32 x 32 one)
        batch = args.batch or (
            int(cfg["training"]["batch_size"]) if dev == "cuda" else 4 if shape[-1] <= 64 else 1
        )
        net = factory.network(cfg["model"], shape, "images").to(dev).train()
        n_params = sum(p.numel() for p in net.parameters())
        x = torch.randn(batch, *shape, device=dev)
        fourier = cfg["model"]["embedding_type"] == "fourier"
        label = torch.rand(batch, device=dev) * (10.0 if fourier else 999.0) + 0.01
        variants = [("fp32", net, x, None)]
        if dev == "cuda":
            cl = net.to(memory_format=torch.channels_last)
            variants += [
                ("fp32 channels_last", cl, x.to(memory_format=torch.channels_last), None),
                ("fp32 torch.compile", torch.compile(net), x, None),
                ("bf16 autocast", net, x, torch.bfloat16),
            ]
        for what, module, inp, dtype in variants:
            sec, mem = time_step(module, inp, label, args.reps, dev, dtype)
            rows.append((name, what, n_params, batch, 1e3 * sec / batch, mem / 2**20))
            print(f"  {name} {what}: {1e3 * sec / batch:.1f} ms/example", file=sys.stderr)
        if args.score_sde is not None:
            ref = score_sde_row(args.score_sde, cfg, batch, args.reps, dev)
            if ref is not None:
                sec, mem = ref
                rows.append(
                    (
                        name,
                        "score_sde_pytorch fp32",
                        n_params,
                        batch,
                        1e3 * sec / batch,
                        mem / 2**20,
                    )
                )
    print(
        f"\nforward + backward, {dev}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    head = ("preset", "variant", "parameters", "batch", "ms / example", "memory MiB")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, what, n, b, ms, mb in rows:
        print(f"| {name} | {what} | {n:,} | {b} | {ms:.1f} | {mb:.0f} |")


if __name__ == "__main__":
    main()
