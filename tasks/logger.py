"""Metrics to Weights & Biases (offline by default: no network, no account), or nowhere."""

from __future__ import annotations

from pathlib import Path

from .common import UserError


class RunLogger:
    """wandb run for rank 0; mode 'disabled' imports nothing and starts no process."""

    def __init__(self, c: dict, out_dir: Path, config: dict, job_type: str) -> None:
        self.run = None
        if c.get("mode", "disabled") == "disabled":
            return
        import wandb

        try:
            self.run = wandb.init(
                project=c.get("project", "scoresde"),
                entity=c.get("entity"),
                mode=c["mode"],
                dir=str(out_dir),
                config=config,
                job_type=job_type,
                reinit="finish_previous",
            )
        except Exception as e:  # e.g. online without an API key
            raise UserError(
                f"logger.mode={c['mode']} could not start wandb "
                f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "use logger.mode=offline or logger.mode=disabled"
            ) from None

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int | None = None) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
