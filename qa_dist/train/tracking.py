"""Metrics: console, wandb and TensorBoard (Accelerate's trackers) on rank zero; a no-op elsewhere.

The tracker is the one owner of rank-zero output: the loop hands it the step scalars and what the
evaluator returns (``eval/`` scalars, and Tables, Curves and Histograms of qa_dist.eval.diagnostics),
and it renders them for each tracker chosen (``logging.trackers``, plus wandb when
``logging.wandb_project`` is set)."""

from __future__ import annotations

import os
import sys
import uuid

from qa_dist.config import LoggingConfig

DEFAULT_WANDB_PROJECT = "qa-dist"
TENSORBOARD_DIR = "tensorboard"
"""Under the run directory: TensorBoard's event files (a resumed run appends to the same directory)."""


def wandb_wanted(config: LoggingConfig) -> bool:
    """Whether to log to wandb: a project is set or ``trackers`` lists wandb, and the mode (see
    ``wandb_mode``) is not disabled. The same answer on every rank (configuration and environment only)."""
    if not (config.wandb_project or "wandb" in config.trackers) or wandb_mode(config) == "disabled":
        return False
    try:
        import wandb  # noqa: F401
    except ImportError:
        from qa_dist.errors import ConfigError

        raise ConfigError(
            "logging.wandb_project is set but wandb is not installed: pip install 'qa-dist[wandb]'"
        ) from None
    return True


def tensorboard_wanted(config: LoggingConfig) -> bool:
    if "tensorboard" not in config.trackers:
        return False
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        from qa_dist.errors import ConfigError

        raise ConfigError(
            "logging.trackers lists tensorboard but it is not installed: pip install tensorboard"
        ) from None
    return True


def trackers_for(config, run_dir) -> list:
    """What ``Accelerator(log_with=...)`` gets: ``"wandb"``, and a TensorBoardTracker writing to
    ``run_dir/tensorboard`` (its writer is only made on rank zero, by ``init_trackers``)."""
    from accelerate.tracking import TensorBoardTracker

    chosen = []
    if wandb_wanted(config.logging):
        chosen.append("wandb")
    if tensorboard_wanted(config.logging):
        chosen.append(TensorBoardTracker(TENSORBOARD_DIR, str(run_dir)))
    return chosen


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

    def progress(self, step: int, total: int) -> None:
        pass

    def finish(self, model_dir=None) -> None:
        pass


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _f1_key(metrics: dict) -> str | None:
    """The headline F1 of an evaluation: SQuAD's eval/f1, CMRC's eval/F1."""
    return next((k for k in ("eval/f1", "eval/F1") if k in metrics), None)


def _markdown(table, limit: int = 20) -> str:
    def cell(value) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.rows[:limit]]
    return "\n".join(lines)


class MainTracker(NoopTracker):
    """Console lines, and the chosen trackers (wandb offline without an API key; TensorBoard under
    run_dir/tensorboard). The best eval F1 and its step are kept in the trainer state (``state``),
    so that a resumed run's summary knows the best of the part before it."""

    def __init__(self, accelerator, config, state, resolved: dict) -> None:
        self.accelerator = accelerator
        self.use_wandb = wandb_wanted(config.logging)
        self.use_tensorboard = tensorboard_wanted(config.logging)
        self.state = state
        self.run_id = state.wandb_run_id or uuid.uuid4().hex[:8]
        state.wandb_run_id = self.run_id
        self.mode = wandb_mode(config.logging)
        self.run_dir = config.run_dir
        self.keep_best = config.train.keep_best
        self.final_f1: tuple[float, int] | None = None
        self.bar = None
        if not (self.use_wandb or self.use_tensorboard):
            return
        init_kwargs = {}
        if self.use_wandb:
            # The mode goes to wandb.init, not into os.environ: the user's environment stays theirs.
            init_kwargs["wandb"] = {
                "id": self.run_id,
                "resume": "allow",
                "dir": config.run_dir,
                "name": os.path.basename(os.path.abspath(config.run_dir)),
                "mode": self.mode,
            }
        try:
            accelerator.init_trackers(config.logging.wandb_project or DEFAULT_WANDB_PROJECT, init_kwargs=init_kwargs)
        except Exception as e:  # wandb's own errors (no network, a bad key) carry long tracebacks
            if not self.use_wandb:
                raise
            from qa_dist.errors import ConfigError

            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"wandb could not start {self.mode} ({first}); run offline with WANDB_MODE=offline "
                "(upload later with wandb sync) or logging.wandb_mode=offline"
            ) from e
        if self.use_wandb:
            accelerator.get_tracker("wandb").store_init_configuration(resolved)
        if self.use_tensorboard:
            # TensorBoard's hparams need flat scalars: the resolved config goes in as YAML text.
            import yaml

            text = yaml.safe_dump(resolved, sort_keys=False)
            self._writer().add_text("config", "```\n" + text + "```", global_step=state.step)

    def _wandb(self):
        return self.accelerator.get_tracker("wandb", unwrap=True) if self.use_wandb else None

    def _writer(self):
        return self.accelerator.get_tracker("tensorboard", unwrap=True) if self.use_tensorboard else None

    def log(self, metrics: dict, step: int) -> None:
        """Numbers go to the console and every tracker; Tables, Curves and Histograms (from the
        evaluator) are rendered for each."""
        scalars = {k: v for k, v in metrics.items() if _is_number(v)}
        rich = {k: v for k, v in metrics.items() if not _is_number(v)}
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars.items())
        self._print(f"step {step}: {shown}")
        if (key := _f1_key(scalars)) is not None:
            self._note_f1(float(scalars[key]), step)
        if not (self.use_wandb or self.use_tensorboard):
            return
        if scalars:
            self.accelerator.log(scalars, step=step)
        if rich:
            self._log_rich(rich, step)

    def _note_f1(self, value: float, step: int) -> None:
        self.final_f1 = (value, step)
        if self.state.best_f1 is None or value > self.state.best_f1:
            self.state.best_f1, self.state.best_f1_step = value, step

    def _log_rich(self, rich: dict, step: int) -> None:
        from qa_dist.eval.diagnostics import Curve, Histogram, Table

        if wb := self._wandb():
            import wandb

            out = {}
            for name, value in rich.items():
                if isinstance(value, Table):
                    out[name] = wandb.Table(columns=value.columns, data=value.rows)
                elif isinstance(value, Curve):
                    columns = [value.x, *value.ys]
                    rows = [[x, *(ys[i] for ys in value.ys.values())] for i, x in enumerate(value.xs)]
                    table = wandb.Table(columns=columns, data=rows)
                    for y in value.ys:
                        key = f"{name}_{y}" if len(value.ys) > 1 else name
                        out[key] = wandb.plot.line(table, value.x, y, title=f"{value.title}: {y} (step {step})")
                elif isinstance(value, Histogram) and value.values:
                    out[name] = wandb.Histogram(value.values)
            if out:
                wb.log(out, step=step)
        if writer := self._writer():
            import numpy as np

            for name, value in rich.items():
                if isinstance(value, Table):
                    writer.add_text(name, _markdown(value), global_step=step)
                elif isinstance(value, Histogram) and value.values:
                    writer.add_histogram(name, np.asarray(value.values, dtype=np.float64), global_step=step)
                # Curves: their chosen points are the eval/ scalars (exact and f1 at the threshold
                # used, gold_top1 and gold_in_nbest as recall at 1 and at n).
            writer.flush()

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

    def summary(self, model_dir=None) -> dict:
        """The run's summary: best eval F1 and its step, the final F1, where the model is."""
        out = {}
        if self.state.best_f1 is not None:
            out["best_eval_f1"] = self.state.best_f1
            out["best_eval_f1_step"] = self.state.best_f1_step
        if self.final_f1 is not None:
            out["final_eval_f1"], out["final_eval_f1_step"] = self.final_f1
        if model_dir is not None:
            out["model_dir"] = str(model_dir)
        if self.keep_best and model_dir is not None:
            out["best_model_dir"] = str(os.path.join(self.run_dir, "best"))
        return out

    def _print_summary(self, summary: dict) -> None:
        if not summary:
            return
        rows = [
            ("best eval F1", f"{summary['best_eval_f1']:.2f} at step {summary['best_eval_f1_step']}")
            if "best_eval_f1" in summary
            else None,
            ("final eval F1", f"{summary['final_eval_f1']:.2f} at step {summary['final_eval_f1_step']}")
            if "final_eval_f1" in summary
            else None,
            ("model", summary.get("model_dir")),
            (f"best model ({self.keep_best})", summary.get("best_model_dir")),
        ]
        rows = [r for r in rows if r is not None and r[1] is not None]
        width = max(len(name) for name, _ in rows) if rows else 0
        lines = ["== run summary"] + [f"  {name:<{width}}  {value}" for name, value in rows]
        self._print("\n".join(lines))

    def finish(self, model_dir=None) -> None:
        """``model_dir``: the exported model (None: the run stopped early, a preemption)."""
        if self.bar is not None:
            self.bar.close()
        summary = self.summary(model_dir)
        if model_dir is not None:
            self._print_summary(summary)
        numbers = {k: v for k, v in summary.items() if _is_number(v)}
        if wb := self._wandb():
            for key, value in summary.items():
                wb.summary[key] = value
        if (writer := self._writer()) and "best_eval_f1" in numbers and model_dir is not None:
            writer.add_scalar("summary/best_eval_f1", numbers["best_eval_f1"], global_step=numbers["best_eval_f1_step"])
            writer.add_text("summary", _markdown(_SummaryTable(summary)), global_step=self.state.step)
        if self.use_wandb or self.use_tensorboard:
            self.accelerator.end_training()
        if self.use_wandb and self.mode == "offline":
            print(
                f"wandb ran offline; upload with: wandb sync {self.run_dir}/wandb/offline-run-*",
                file=sys.stderr,
            )


class _SummaryTable:
    columns = ["key", "value"]

    def __init__(self, summary: dict) -> None:
        self.rows = [[k, v] for k, v in summary.items()]


def run_info(accelerator, config, n_params: int) -> dict:
    """What the dashboard's config carries besides the run config."""
    t = config.train
    return {
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "effective_batch_size": t.per_device_batch_size * t.gradient_accumulation_steps * accelerator.num_processes,
        "parameters": n_params,
    }


def make_tracker(accelerator, config, state, resolved: dict):
    """``state``: the TrainState (its wandb run id is reused on a resume, and set here)."""
    return MainTracker(accelerator, config, state, resolved) if accelerator.is_main_process else NoopTracker()
