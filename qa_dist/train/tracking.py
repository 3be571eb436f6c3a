"""Metrics: console and wandb (through Accelerate's tracker) on rank zero; a no-op elsewhere."""

from __future__ import annotations

import os
import sys
import uuid

from qa_dist.config import LoggingConfig


def wandb_wanted(config: LoggingConfig) -> bool:
    """Whether to log to wandb: a project is set and the mode (see ``wandb_mode``) is not disabled.
    The same answer on every rank (configuration and environment only)."""
    if not config.wandb_project or wandb_mode(config) == "disabled":
        return False
    try:
        import wandb  # noqa: F401
    except ImportError:
        from qa_dist.errors import ConfigError

        raise ConfigError(
            "logging.wandb_project is set but wandb is not installed: pip install 'qa-dist[wandb]'"
        ) from None
    return True


_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def wandb_mode(config: LoggingConfig, environ=None) -> str:
    """``logging.wandb_mode`` unless it is ``auto``. With ``auto`` the user's environment decides as
    wandb's own does: ``WANDB_MODE`` (online, offline, disabled; run and dryrun as their old
    names) wins, ``WANDB_DISABLED=true`` disables; without either, online with ``WANDB_API_KEY``
    and offline without (a cluster node without a key has no business waiting for the network)."""
    if config.wandb_mode != "auto":
        return config.wandb_mode
    env = os.environ if environ is None else environ
    mode = env.get("WANDB_MODE", "").strip().lower()
    if mode in _ENV_MODES:
        return _ENV_MODES[mode]
    if env.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled"
    return "online" if env.get("WANDB_API_KEY") else "offline"


class NoopTracker:
    """What every rank but zero gets: rank-zero-only side effects need no ``if rank == 0``."""

    run_id: str | None = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        pass

    def progress(self, step: int, total: int) -> None:
        pass

    def finish(self) -> None:
        pass


class MainTracker(NoopTracker):
    """Console lines, and wandb when configured (offline without an API key)."""

    def __init__(self, accelerator, config, run_id: str | None, resolved: dict) -> None:
        self.accelerator = accelerator
        self.use_wandb = wandb_wanted(config.logging)
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.mode = wandb_mode(config.logging)
        self.run_dir = config.run_dir
        self.bar = None
        if self.use_wandb:
            # The mode goes to wandb.init, not into os.environ: the user's environment stays theirs.
            try:
                accelerator.init_trackers(
                    config.logging.wandb_project,
                    config=resolved,
                    init_kwargs={
                        "wandb": {
                            "id": self.run_id,
                            "resume": "allow",
                            "dir": config.run_dir,
                            "name": os.path.basename(os.path.abspath(config.run_dir)),
                            "mode": self.mode,
                        }
                    },
                )
            except Exception as e:  # wandb's own errors (no network, a bad key) carry long tracebacks
                from qa_dist.errors import ConfigError

                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(
                    f"wandb could not start {self.mode} ({first}); run offline with WANDB_MODE=offline "
                    "(upload later with wandb sync) or logging.wandb_mode=offline"
                ) from e

    def log(self, metrics: dict, step: int) -> None:
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        self._print(f"step {step}: {shown}")
        if self.use_wandb:
            self.accelerator.log(metrics, step=step)

    def progress(self, step: int, total: int) -> None:
        """A progress bar of optimizer steps on a terminal; none in a log file (Slurm's, a test's),
        which gets the step lines only."""
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=step - 1, desc="training", unit="step", file=sys.stderr, disable=None)
        self.bar.update(step - self.bar.n)
        if step >= total:
            self.bar.close()

    def _print(self, line: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=sys.stderr)  # above the bar, not through it
        else:
            print(line, file=sys.stderr, flush=True)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        if self.use_wandb:
            import wandb

            self.accelerator.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.use_wandb:
            self.accelerator.end_training()
            if self.mode == "offline":
                print(
                    f"wandb ran offline; upload with: wandb sync {self.run_dir}/wandb/offline-run-*",
                    file=sys.stderr,
                )


def make_tracker(accelerator, config, run_id: str | None, resolved: dict):
    return MainTracker(accelerator, config, run_id, resolved) if accelerator.is_main_process else NoopTracker()
