"""scoresde entry point: python run.py [mode=train|sample|nll] [group=choice ...] [key=value ...]

Thin by design: check the overrides, compose the config with Hydra, validate it, dispatch on mode.
Bad input of any kind ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parent / "conf"
_RANK_DIRS: list[str] = []  # this rank's temporary Hydra folder (ranks other than 0)
GROUPS = (
    "sde", "data", "model", "training", "sampler", "likelihood", "logger", "eval", "experiment"
)  # fmt: skip


def _remove_rank_dirs() -> None:
    import shutil

    for tmp in _RANK_DIRS:
        shutil.rmtree(tmp, ignore_errors=True)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _first_job(overrides: list) -> list[str]:
    """The overrides of a sweep's first job (each sweep replaced by its first value), as text."""
    out = []
    for o in overrides:
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None)
            out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(o.input_line)
    return out


def _check_group_values(overrides: list) -> None:
    """Each value given for a config group (every value of a sweep) names a file of the group."""
    for o in overrides:
        group = o.key_or_group
        if group not in GROUPS or o.is_delete():
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        choices = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        for v in values:
            if isinstance(v, str) and v not in choices:
                fail(
                    f"{group}={v} is not a known {group} config; allowed: "
                    f"{', '.join(choices)} (files in conf/{group}/)"
                )


def _check_writable(root: str) -> None:
    """outputs_root must be a folder this process can create and write to."""
    import tempfile

    path = Path(root).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        fail(
            f"outputs_root={root} is not a writable folder ({e.strerror or type(e).__name__}); "
            "pass outputs_root=<a folder you can write to>"
        )


def check_args(argv: list[str]) -> None:
    """Check the command line before Hydra's own entry, so that bad input is one line (exit 2).

    The arguments are read by Hydra's own parser, so its flags (-m, --cfg job, --info, --help,
    hydra/launcher=...) reach Hydra untouched; the overrides, sweeps included, are parsed by
    Hydra's override grammar, every config-group value of a sweep is checked, and the first
    job's config is composed (with Hydra's own config, so a launcher that is not installed is
    named) and its outputs_root checked for writing.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_args(argv)  # argparse itself exits 2 on an unknown flag
    if args.help or args.hydra_help or args.shell_completion:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception as e:
        fail(f"cannot parse the overrides {' '.join(args.overrides)}: {str(e).splitlines()[0]}")
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if sweeps and not args.multirun:
        fail(f"{' '.join(sweeps)} lists several values: add -m (--multirun) to sweep over them")
    _check_group_values(parsed)
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=_first_job(parsed), return_hydra_config=True)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        hint = ""
        if any("hydra/launcher" in o for o in args.overrides):
            hint = "; the Slurm launcher is an optional extra: pip install -e '.[slurm]'"
        fail(f"bad override: {' '.join(lines[:2]) or type(e).__name__}{hint}")
    finally:
        GlobalHydra.instance().clear()
    if not args.cfg and not args.info:
        _check_writable(str(cfg.outputs_root))
        if cfg.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                fail("device=cuda but no CUDA device is available; use device=cpu or device=auto")


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def entry(dcfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from sde_lib.errors import UserError
        from tasks import dispatch

        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 speaks for the run
            logging.getLogger().setLevel(logging.WARNING)
        cfg = OmegaConf.to_container(dcfg, resolve=True)
        # the command line's overrides, for messages that name other configurations
        cfg["overrides"] = list(HydraConfig.get().overrides.task)
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            dispatch(cfg, out_dir)
        except UserError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted")
        except Exception as e:
            from training.distributed import is_peer_failure

            if not is_peer_failure(e):
                raise
            rank = os.environ.get("RANK", "0")
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            print(
                f"error: rank {rank} lost another process of the run ({first}); the run stopped, "
                "its checkpoints are kept: fix the cause and rerun (mode=train resume=true)",
                file=sys.stderr,
            )
            # leave now: with a peer gone, the process group's finalisers can wait on it until
            # the launcher's grace period ends in SIGKILL (checkpoints and logs are closed already)
            _remove_rank_dirs()  # what atexit would have done
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    entry()


def _rank_argv(argv: list[str]) -> list[str]:
    """Under torchrun, ranks other than 0 write nothing of Hydra's (rank 0's run folder is the
    run's): their Hydra folder goes to a temporary directory removed at exit."""
    if int(os.environ.get("RANK", "0")) == 0:
        return argv
    import atexit
    import tempfile

    _RANK_DIRS.append(tempfile.mkdtemp(prefix="scoresde-rank-"))
    atexit.register(_remove_rank_dirs)
    return [*argv, f"hydra.run.dir={_RANK_DIRS[-1]}", "hydra.output_subdir=null"]


if __name__ == "__main__":
    check_args(sys.argv[1:])
    sys.argv = [sys.argv[0], *_rank_argv(sys.argv[1:])]
    main()
