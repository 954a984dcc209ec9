"""Maximum-likelihood fine-tuning through the probability-flow ODE, end to end from run.py.

    python bench/nll_finetune.py [--data gmm8] [--dsm-steps 2000] [--nll-steps 60] [--lr 1e-4]
                                 [--batch 64] [--nll-tol 1e-3]
                                 [--outputs-root bench_out/nll_finetune]

1. trains the default score model by denoising score matching (`mode=train`, --dsm-steps);
2. evaluates its test NLL through the ODE (`mode=nll`, 500 test points, exact trace) against the
   exact NLL of the law;
3. fine-tunes it by `training.loss=nll` (-log p through the per-point ODE solver, gradients by
   backpropagation through its steps) from `training.init_from=` for --nll-steps at --lr;
4. evaluates the fine-tuned model the same way, and prints both rows.

Every step is reused from --outputs-root when it has run before.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipes import run  # run.py's dispatch with a composed config  # noqa: E402


def stage(root: Path, name: str, overrides: list[str]) -> tuple[dict, float]:
    """Run one mode into root/name once; (its summary, seconds)."""
    done = root / name / "result.json"
    if done.is_file():
        d = json.loads(done.read_text())
        return d["summary"], d["seconds"]
    start = time.perf_counter()
    summary = run(root / name, root / name / "out", overrides)
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"summary": summary, "seconds": seconds}, default=str))
    return summary, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="gmm8")
    p.add_argument("--dsm-steps", type=int, default=2000)
    p.add_argument("--nll-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--nll-tol", type=float, default=1e-3, help="the training ODE's rtol = atol")
    p.add_argument("--outputs-root", default="bench_out/nll_finetune")
    a = p.parse_args()
    root = Path(a.outputs_root).resolve()
    data = f"data={a.data}"
    dsm, dsm_s = stage(root, "dsm", ["mode=train", data, f"training.steps={a.dsm_steps}"])
    before, _ = stage(root, "nll_dsm", ["mode=nll", data, f"ckpt={dsm['checkpoint']}"])
    tuned, nll_s = stage(
        root,
        "nll_train",
        ["mode=train", data, "training.loss=nll", f"training.init_from={dsm['checkpoint']}",
         f"training.steps={a.nll_steps}", f"training.lr={a.lr}", "training.warmup=0",
         f"training.batch_size={a.batch}", f"training.nll_tol={a.nll_tol}"],
    )  # fmt: skip
    after, _ = stage(root, "nll_tuned", ["mode=nll", data, f"ckpt={tuned['checkpoint']}"])
    print(f"\n{a.data}: test NLL through the ODE (500 points, exact trace), exact NLL "
          f"{before['exact_nll_nats']:.4f} nats\n")  # fmt: skip
    print("| model | training | test NLL (nats) | gap to exact | NFE/point |")
    print("|---|---|---|---|---|")
    for name, s, t in (
        (f"DSM, {a.dsm_steps} steps", before, dsm_s),
        (
            f"+ {a.nll_steps} steps of training.loss=nll "
            f"(lr {a.lr}, batch {a.batch}, tol {a.nll_tol})",
            after,
            nll_s,
        ),
    ):
        print(f"| {name} | {t / 60:.1f} min | {s['nll_nats']:.4f} ± {s['stderr']:.4f} | "
              f"{s['gap']:.4f} ± {s['gap_stderr']:.4f} | {s['nfe_mean']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
