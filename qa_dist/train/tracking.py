"""Metrics: console, wandb and TensorBoard (Accelerate's trackers) on rank zero; a no-op elsewhere.

The loop hands the tracker the step scalars (``step_metrics``: loss, throughput, and on GPUs peak
memory and MFU) and what the evaluator returns (``eval/`` scalars, and Tables, Curves and
Histograms of qa_dist.eval.diagnostics); it renders them for each tracker chosen
(``logging.trackers``, plus wandb when ``logging.wandb_project`` is set) and prints through rank
zero's reporter (qa_dist.runtime.report)."""

from __future__ import annotations

import contextlib
import os
import time
import uuid

import numpy as np
import torch
import yaml
from accelerate.tracking import TensorBoardTracker

from qa_dist.config import LoggingConfig, TrainConfig
from qa_dist.errors import ConfigError
from qa_dist.eval.diagnostics import Curve, Histogram, Table
from qa_dist.runtime.dist import sum_over_ranks
from qa_dist.runtime.report import Reporter

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) of common training GPUs, by name fragment.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "T4": 65.0,
    "A6000": 155.0,
    "4090": 165.0,
    "3090": 71.0,
}


def mfu(n_params: int, tokens_per_s: float, world_size: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: 6 FLOPs per parameter per token (forward and backward) against the
    peak of all devices. An estimate: attention's own FLOPs are left out, as is usual."""
    return 6.0 * n_params * tokens_per_s / (peak_tflops * 1e12 * world_size)


def gpu_peak_tflops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


class Meter:
    """This rank's samples, real tokens and loss since the last log line. Counts come from the CPU
    batch and the loss is summed on the device: nothing waits for the GPU until a log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.samples = self.tokens = 0
        self.loss_sum, self.loss_count = None, 0
        self.started = time.perf_counter()
        self.paused_seconds = {"eval": 0.0, "checkpoint": 0.0}

    @contextlib.contextmanager
    def paused(self, kind: str):
        """Time spent evaluating or checkpointing: left out of samples_per_s and tokens_per_s, and
        logged on its own (``time/eval_s``, ``time/checkpoint_s``)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds[kind] += time.perf_counter() - started

    def add(self, cpu_batch: dict, loss: torch.Tensor) -> None:
        self.samples += int(cpu_batch["input_ids"].shape[0])
        self.tokens += int(cpu_batch["attention_mask"].sum())
        loss = loss.detach().double()  # float64, as the Python floats summed before
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.loss_count += 1

    def loss_total(self) -> float:
        """The device sum, read (a host sync) only here, at log steps."""
        return 0.0 if self.loss_sum is None else float(self.loss_sum)


def step_metrics(meter: Meter, acc, scheduler, epoch: int, grad_norm, n_params: int) -> dict:
    """What is logged every log_every steps. Every rank calls this: the counts are summed over the
    ranks (length-grouped batches give the ranks different token counts)."""
    local = [meter.samples, meter.tokens, meter.loss_total(), meter.loss_count]
    if acc.device.type == "cuda":
        # Kernels still queued (the optimizer's, after the loss was read) belong to this interval;
        # a log step waits for the device anyway.
        torch.cuda.synchronize(acc.device)
    paused = sum(meter.paused_seconds.values())
    seconds = max(time.perf_counter() - meter.started - paused, 1e-9)
    samples, tokens, loss_sum, loss_count = sum_over_ranks(local, acc.device)
    metrics = {
        "loss": loss_sum / max(loss_count, 1),
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "lr": scheduler.get_last_lr()[0],
        "epoch": epoch,
    }
    metrics |= {f"time/{kind}_s": s for kind, s in meter.paused_seconds.items() if s}
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    if acc.device.type == "cuda":
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if peak := gpu_peak_tflops():
            metrics["mfu"] = mfu(n_params, metrics["tokens_per_s"], acc.num_processes, peak)
    return metrics


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
        raise ConfigError(
            "logging.trackers lists tensorboard but it is not installed: pip install tensorboard"
        ) from None
    return True


def trackers_for(config: LoggingConfig, run_dir) -> list:
    """What ``Accelerator(log_with=...)`` gets: ``"wandb"``, and a TensorBoardTracker writing to
    ``run_dir/tensorboard`` (its writer is only made on rank zero, by ``init_trackers``)."""
    chosen = []
    if wandb_wanted(config):
        chosen.append("wandb")
    if tensorboard_wanted(config):
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
    """What every rank but zero gets (its reporter is silent): its side effects need no rank test."""

    run_id: str | None = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def progress(self, step: int, total: int) -> None:
        pass

    def finish(self, model_dir=None) -> None:
        pass


def _has_ans_f1(metrics: dict) -> float | None:
    """F1 on the answerable questions (SQuAD v2's HasAns_f1, CMRC's HasAns_F1), where reported."""
    value = next((metrics[k] for k in ("eval/HasAns_f1", "eval/HasAns_F1") if k in metrics), None)
    return float(value) if _is_number(value) else None


def _f1_row(summary: dict, which: str) -> str | None:
    if f"{which}_eval_f1" not in summary:
        return None
    row = f"{summary[f'{which}_eval_f1']:.2f} at step {summary[f'{which}_eval_f1_step']}"
    has_ans = summary.get(f"{which}_eval_has_ans_f1")
    return row + (f" (answerable questions: F1 {has_ans:.2f})" if has_ans is not None else "")


def abstention_note(has_ans_f1: float | None) -> str | None:
    """One line when a model answers none of the answerable questions right: its overall F1 then
    comes from abstaining on the unanswerable ones, and says nothing about reading."""
    if has_ans_f1 is None or has_ans_f1 > 0:
        return None
    return (
        "the model answers no answerable question (F1 0 on them): its F1 comes from answering "
        '"no answer" to the unanswerable ones; train longer or with a higher train.lr'
    )


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
    run_dir/tensorboard; the caller's own Accelerate trackers, ``custom``, which get the resolved
    config and every scalar). The best eval F1 and its step are kept in the trainer state
    (``state``), so that a resumed run's summary knows the best of the part before it."""

    def __init__(self, accelerator, config, state, resolved: dict, report: Reporter, custom=()) -> None:
        self.accelerator = accelerator
        self.report = report
        self.use_wandb = wandb_wanted(config.logging)
        self.use_tensorboard = tensorboard_wanted(config.logging)
        self.custom = tuple(custom)
        self.any_tracker = self.use_wandb or self.use_tensorboard or bool(self.custom)
        self.state = state
        self.run_id = state.wandb_run_id or uuid.uuid4().hex[:8]
        state.wandb_run_id = self.run_id
        self.mode = wandb_mode(config.logging)
        self.run_dir = config.run_dir
        self.keep_best = config.train.keep_best
        self.final_f1: tuple[float, int, float | None] | None = None
        self.bar = None
        if not self.any_tracker:
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
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"wandb could not start {self.mode} ({first}); run offline with WANDB_MODE=offline "
                "(upload later with wandb sync) or logging.wandb_mode=offline"
            ) from e
        if self.use_wandb:
            accelerator.get_tracker("wandb").store_init_configuration(resolved)
        for tracker in self.custom:
            tracker.store_init_configuration(resolved)
        if self.use_tensorboard:
            # TensorBoard's hparams need flat scalars: the resolved config goes in as YAML text.
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
            self._note_f1(float(scalars[key]), step, _has_ans_f1(scalars))
        if not self.any_tracker:
            return
        if scalars:
            self.accelerator.log(scalars, step=step)
        if rich:
            self._log_rich(rich, step)

    def _note_f1(self, value: float, step: int, has_ans: float | None) -> None:
        self.final_f1 = (value, step, has_ans)
        if self.state.best_f1 is None or value > self.state.best_f1:
            self.state.best_f1, self.state.best_f1_step, self.state.best_has_ans_f1 = value, step, has_ans

    def _log_rich(self, rich: dict, step: int) -> None:
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
            self.bar = self.report.bar(total, initial=step - 1, desc="training", unit="step")
        self.bar.update(step - self.bar.n)
        if step >= total:
            self.bar.close()

    def _print(self, line: str) -> None:
        self.report.line(line)

    def summary(self, model_dir=None) -> dict:
        """The run's summary: best eval F1 and its step, the final F1, where the model is."""
        out = {}
        if self.state.best_f1 is not None:
            out["best_eval_f1"] = self.state.best_f1
            out["best_eval_f1_step"] = self.state.best_f1_step
            if self.state.best_has_ans_f1 is not None:
                out["best_eval_has_ans_f1"] = self.state.best_has_ans_f1
        if self.final_f1 is not None:
            out["final_eval_f1"], out["final_eval_f1_step"], has_ans = self.final_f1
            if has_ans is not None:
                out["final_eval_has_ans_f1"] = has_ans
        if model_dir is not None:
            out["model_dir"] = str(model_dir)
        if self.keep_best and model_dir is not None:
            out["best_model_dir"] = str(os.path.join(self.run_dir, "best"))
        return out

    def _print_summary(self, summary: dict) -> None:
        if not summary:
            return
        rows = [
            ("best eval F1", _f1_row(summary, "best")),
            ("final eval F1", _f1_row(summary, "final")),
            ("model", summary.get("model_dir")),
            (f"best model ({self.keep_best})", summary.get("best_model_dir")),
            ("note", abstention_note(summary.get("final_eval_has_ans_f1"))),
        ]
        rows = [r for r in rows if r[1] is not None]
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
        if self.any_tracker:
            self.accelerator.end_training()
        if self.use_wandb and self.mode == "offline":
            self._print(f"wandb ran offline; upload with: wandb sync {self.run_dir}/wandb/offline-run-*")


class _SummaryTable:
    columns = ["key", "value"]

    def __init__(self, summary: dict) -> None:
        self.rows = [[k, v] for k, v in summary.items()]


def run_info(accelerator, t: TrainConfig, n_params: int) -> dict:
    """What the dashboard's config carries besides the run config."""
    return {
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "effective_batch_size": t.per_device_batch_size * t.gradient_accumulation_steps * accelerator.num_processes,
        "parameters": n_params,
    }


def make_tracker(accelerator, config, state, resolved: dict, report: Reporter, custom=()):
    """``state``: the TrainState (its wandb run id is reused on a resume, and set here). Rank zero
    (the rank whose reporter is not silent) gets the trackers; the others a no-op. ``custom``: the
    caller's ``accelerate.tracking.GeneralTracker`` instances, already passed to the Accelerator."""
    return MainTracker(accelerator, config, state, resolved, report, custom) if report.active else NoopTracker()
