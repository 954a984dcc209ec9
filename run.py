"""scoresde entry point: python run.py [mode=train|sample|nll] [group=choice ...] [key=value ...]

Thin by design: check the overrides, compose the config with Hydra, validate it, dispatch on mode.
Bad input of any kind ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONF = Path(__file__).resolve().parent / "conf"
GROUPS = ("sde", "data", "model", "training", "sampler", "likelihood", "logger", "eval")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_overrides(args: list[str]) -> None:
    """Compose the config once before Hydra's own entry so that a bad override is one line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        fail(f"cannot parse the overrides {' '.join(overrides)}: {str(e).splitlines()[0]}")
    for o in parsed:
        group = o.key_or_group
        if group in GROUPS and not o.is_delete() and isinstance(o.value(), str):
            choices = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
            if o.value() not in choices:
                fail(
                    f"{group}={o.value()} is not a known {group} config; allowed: "
                    f"{', '.join(choices)} (files in conf/{group}/)"
                )
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose("config", overrides=[o for o in overrides if not o.startswith("hydra")])
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        fail(f"bad override: {' '.join(lines[:2]) or type(e).__name__}")
    finally:
        GlobalHydra.instance().clear()


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def entry(dcfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from tasks import dispatch
        from tasks.common import UserError

        cfg = OmegaConf.to_container(dcfg, resolve=True)
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            dispatch(cfg, out_dir)
        except UserError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted")

    entry()


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
