"""Everything a training run is built from, in the order it must be built: the accelerator, the
features (checked against the batch plan before the model loads), the model and optimizer under
Accelerate, the checkpointer and the state it restores, the tracker, the evaluator and the best
keeper. Every rank builds the same run; ``qa_dist.train.loop`` runs it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from accelerate.utils import set_seed

from qa_dist.config import RunConfig, config_to_dict, resolved_config_record
from qa_dist.errors import AgreedError, ConfigError
from qa_dist.eval.evaluator import GatheredEvaluator
from qa_dist.eval.hooks import Evaluator, NullEvaluator
from qa_dist.features.batches import FeatureColumns
from qa_dist.features.prepare import prepare_features
from qa_dist.models import enable_gradient_checkpointing, load_qa_model, load_tokenizer, parameter_count
from qa_dist.runtime.dist import context_of, enable_tf32, fill_deepspeed_config, make_accelerator, max_over_ranks
from qa_dist.runtime.faults import kill_point
from qa_dist.runtime.fsutil import atomic_write, recover_dir, remove_path, replace_dir
from qa_dist.runtime.preemption import clear_preempted_marker
from qa_dist.runtime.report import Reporter, reporter_for
from qa_dist.runtime.rundir import LOCK_FILE, RunDirLock, held_message, read_holder
from qa_dist.train.best import BestKeeper
from qa_dist.train.checkpoint import Checkpointer, TrainState
from qa_dist.train.export import check_export, export_model
from qa_dist.train.inference import batch_logits
from qa_dist.train.optim import make_optimizer, make_scheduler
from qa_dist.train.tracking import make_tracker, run_info, trackers_for


@dataclass
class Run:
    """One training run's parts, built by ``build_run``."""

    config: RunConfig
    acc: Any
    """The ``accelerate.Accelerator``."""
    report: Reporter
    tokenizer: Any
    columns: FeatureColumns
    """The training windows, memory-mapped from the feature cache."""
    per_epoch: int
    total_steps: int
    model: Any
    optimizer: Any
    scheduler: Any
    n_params: int
    checkpointer: Checkpointer
    state: TrainState
    tracker: Any
    evaluator: Evaluator
    keeper: BestKeeper | None = None
    lock: RunDirLock | None = None
    """The run directory's lock (global rank zero holds it; None elsewhere)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def export(self, out_dir: Path, *, files: dict[str, str] | None = None, report_dir: Path | None = None) -> None:
        """The model as a Hugging Face directory at ``out_dir``, with ``files`` (name: text) beside
        it, and the export check's report unless ``report_dir`` says where else. It is verified
        against the trained model's logits on a few training windows before it is put in place:
        ``out_dir`` never holds a half-written or unverified export. Every rank calls this (ZeRO-3
        gathers the weights collectively)."""
        acc, partial = self.acc, out_dir.with_name(out_dir.name + ".partial")
        if acc.is_main_process:
            recover_dir(out_dir)  # the last complete export, should a kill have caught it set aside
            remove_path(partial)  # a killed export's leftover, or a link planted there
            partial.mkdir(parents=True)  # a fresh folder: nothing is written through a link
        acc.wait_for_everyone()
        kill_point("export:before-weights")
        export_model(acc, self.model, self.tokenizer, partial, data=self.config.data)
        sample = self.columns.batch(np.arange(min(8, len(self.columns))), self.pad_id)
        tolerance = 1e-4 if self.config.train.mixed_precision == "no" else 2e-2
        check_export(acc, self.model, sample, partial, tolerance, report_dir=report_dir or partial)
        if acc.is_main_process:
            for name, text in (files or {}).items():
                atomic_write(partial / name, text)
            kill_point("export:before-publish")
            replace_dir(partial, out_dir)
        acc.wait_for_everyone()


def build_run(config: RunConfig, evaluator: Evaluator | None = None, trackers: Sequence = ()) -> Run:
    """Every rank calls this with the same config; collectives inside (the run directory's lock,
    the cache, the model under ZeRO-3, the checkpoint's verdict) run on all of them."""
    t, run_dir = config.train, Path(config.run_dir)
    acc = make_accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        timeout_seconds=t.collective_timeout,
        log_with=[*trackers_for(config.logging, run_dir), *trackers] or None,
        project_dir=str(run_dir),
        compile=t.compile,
    )
    lock = lock_run_dir(acc, run_dir)
    try:
        run = _build(config, acc, evaluator, trackers)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def lock_run_dir(acc, run_dir: Path) -> RunDirLock | None:
    """Global rank zero takes the run directory's lock; every rank learns whether it could, so that
    all stop together, before anything is written there, when another run holds it."""
    lock, problem = (RunDirLock(run_dir), "") if acc.is_main_process else (None, "")
    if lock is not None:
        try:
            lock.acquire()
        except ConfigError as e:
            lock, problem = None, str(e)
        except OSError as e:  # an unwritable run directory: a verdict for every rank, not a hang
            lock, problem = None, f"run_dir {run_dir}: cannot take its lock ({e.strerror or e})"
    if max_over_ranks(int(bool(problem)), acc.device):
        holder = read_holder(run_dir / LOCK_FILE) or {}
        raise AgreedError(problem or held_message(run_dir, holder))
    return lock


def _build(config: RunConfig, acc, evaluator: Evaluator | None, trackers: Sequence) -> Run:
    t, run_dir = config.train, Path(config.run_dir)
    if acc.device.type == "cuda" and t.tf32:
        enable_tf32()
    set_seed(t.seed)
    report = reporter_for(acc.process_index)
    report.write_text(*resolved_config_record(config))
    clear_preempted_marker(report, run_dir)
    tokenizer = load_tokenizer(config.model)
    prepared = prepare_features(config.data, tokenizer, context_of(acc), roles=("train",), report=report)
    columns = FeatureColumns.from_table(prepared["train"].entry.table("features"))
    per_epoch = t.steps_per_epoch(len(columns), acc.num_processes)  # before the model: a plan that fills no step
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))

    model = load_qa_model(
        config.model, tokenizer=tokenizer, for_training=True, attn_implementation=t.attn_implementation
    )
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    n_params = parameter_count(model)
    sharded = acc.state.deepspeed_plugin is not None or acc.distributed_type.value == "FSDP"
    optimizer = make_optimizer(model, t, device_type=acc.device.type, sharded=sharded)
    scheduler = make_scheduler(optimizer, t, total_steps)
    fill_deepspeed_config(acc, t)
    # The scheduler is not registered with Accelerate (it pickles registered objects and loads them
    # with weights_only=False): the checkpointer keeps its state as JSON.
    model, optimizer = acc.prepare(model, optimizer)
    report.line(
        f"training on {acc.num_processes} process(es) ({acc.distributed_type.value}, {acc.device.type}"
        f"{', gradient checkpointing' if t.gradient_checkpointing else ''}): {n_params / 1e6:,.1f}M parameters, "
        f"{len(columns):,} windows, {per_epoch:,} optimizer steps per epoch, {total_steps:,} in all"
    )
    checkpointer = Checkpointer(acc, run_dir, t.checkpoint_every, t.keep_checkpoints, scheduler)
    state = checkpointer.restore(config.resume) or TrainState()
    resolved = {**config_to_dict(config), "run": run_info(acc, t, n_params)}
    tracker = make_tracker(acc, config, state, resolved, report, trackers)
    if evaluator is None and config.data.eval:
        forward = lambda m, b: batch_logits(acc, m, b)  # noqa: E731
        evaluator = GatheredEvaluator(config, tokenizer, context_of(acc), forward, report)
    run = Run(
        config, acc, report, tokenizer, columns, per_epoch, total_steps, model, optimizer, scheduler, n_params,
        checkpointer, state, tracker, evaluator or NullEvaluator(),
    )  # fmt: skip
    if t.keep_best:  # each best model is exported and verified as the final one is
        run.keeper = BestKeeper(acc, run_dir, t.keep_best, checkpointer, run.export)
        run.keeper.check_resumed(state)
    return run
