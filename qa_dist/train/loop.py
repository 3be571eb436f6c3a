"""``qa-dist train``: one training run in whatever process group launched it."""

from __future__ import annotations

import math
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate.utils import set_seed

from qa_dist.config import RunConfig, config_to_dict, resolved_config_record
from qa_dist.eval.evaluator import GatheredEvaluator
from qa_dist.eval.hooks import Evaluator, NullEvaluator, PeriodicEvaluator
from qa_dist.features.batches import FeatureColumns, micro_batches
from qa_dist.features.prepare import prepare_features
from qa_dist.models import enable_gradient_checkpointing, load_qa_model, load_tokenizer, parameter_count
from qa_dist.runtime.dist import (
    context_of,
    enable_tf32,
    fill_deepspeed_config,
    make_accelerator,
    max_over_ranks,
    to_device,
)
from qa_dist.runtime.preemption import PreemptionFlag, clear_preempted_marker, write_preempted_marker
from qa_dist.runtime.report import reporter_for
from qa_dist.train.best import BestKeeper
from qa_dist.train.checkpoint import Checkpointer, TrainState
from qa_dist.train.export import check_export, export_model
from qa_dist.train.inference import batch_logits
from qa_dist.train.optim import make_optimizer, make_scheduler
from qa_dist.train.tracking import Meter, make_tracker, run_info, step_metrics, trackers_for


@dataclass
class TrainResult:
    steps: int
    preempted: bool
    export_dir: Path | None


def train(config: RunConfig, evaluator: Evaluator | None = None, trackers: Sequence = ()) -> TrainResult:
    """One training run in the process group that launched it; every rank calls this. ``evaluator``
    replaces the gathered EM/F1 evaluation of ``data.eval``; ``trackers``: your own
    ``accelerate.tracking.GeneralTracker`` instances beside ``logging.trackers`` (Accelerate calls
    them on the main process only): they get the resolved config and every logged scalar."""
    t = config.train
    if evaluator is None:
        config.check_keep_best()
    run_dir = Path(config.run_dir)
    acc = make_accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        timeout_seconds=t.collective_timeout,
        log_with=[*trackers_for(config.logging, run_dir), *trackers] or None,
        project_dir=str(run_dir),
        compile=t.compile,
    )
    cuda = acc.device.type == "cuda"
    if cuda and t.tf32:
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
    model, optimizer = acc.prepare(model, optimizer)
    # Not registered with Accelerate (it pickles registered objects and loads them with
    # weights_only=False): the checkpointer keeps the scheduler's state as JSON.

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
        evaluator = GatheredEvaluator(config, tokenizer, context_of(acc), lambda m, b: batch_logits(acc, m, b), report)
    evaluator = evaluator or NullEvaluator()

    def export_best(out_dir: Path) -> None:  # train.keep_best: verified like the final export
        export_model(acc, model, tokenizer, out_dir, data=config.data)
        sample = columns.batch(np.arange(min(8, len(columns))), pad_id)
        check_export(acc, model, sample, out_dir, 1e-4 if t.mixed_precision == "no" else 2e-2, report_dir=out_dir)

    keeper = BestKeeper(acc, run_dir, t.keep_best, checkpointer, export_best) if t.keep_best else None
    preemption = PreemptionFlag()
    meter, pad_id = Meter(), tokenizer.pad_token_id or 0

    def evaluate(run) -> None:
        """The evaluator's ``maybe_run`` or ``finish`` at this step; a signal stops it on every rank
        at the same batch. Every rank calls this."""
        metrics = None
        with preemption.evaluation():
            metrics = run(state.step, model)
        if metrics is not None:
            tracker.log(metrics, state.step)
        # Every rank, after each evaluation (any step, for an evaluator that does not say when it
        # last ran): rank zero's metrics decide.
        if keeper is not None and getattr(evaluator, "last_step", state.step) == state.step:
            keeper.update(metrics, state)

    def stop_if_preempted() -> TrainResult | None:
        """Every rank learns whether any rank was signalled, so all save and stop together. A step
        already checkpointed (the last, or the one resumed from) is not saved again."""
        if not (signum := max_over_ranks(preemption.signum, acc.device)):
            return None
        state.eval_pending = preemption.stopped_evaluation
        checkpointer.ensure_saved(state)
        write_preempted_marker(report, run_dir, state.step, signal.Signals(signum).name)
        # No rank exits (75) before the marker exists: on several nodes srun's --kill-on-bad-exit
        # would otherwise end rank zero before it wrote it, and no requeue.
        acc.wait_for_everyone()
        tracker.finish()
        return TrainResult(state.step, preempted=True, export_dir=None)

    try:
        if state.eval_pending:  # the checkpointed step's evaluation, which the preemption stopped
            state.eval_pending = False
            evaluate(evaluator.maybe_run)
            if stopped := stop_if_preempted():
                return stopped
        model.train()
        positions = micro_batches(
            columns.lengths, t, acc.process_index, acc.num_processes, epoch=state.epoch, micro_step=state.micro_step
        )
        for epoch, micro, indices in positions:
            if state.step >= total_steps:
                break
            cpu_batch = columns.batch(indices, pad_id)
            batch = to_device(cpu_batch, acc.device, pin_memory=cuda and t.pin_memory)
            with acc.accumulate(model):
                loss = model(**batch).loss
                acc.backward(loss)
                clip = acc.sync_gradients and t.max_grad_norm
                grad_norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm) if clip else None
                optimizer.step()
                optimizer.zero_grad()
            meter.add(cpu_batch, loss)  # no .item(): no host sync per micro-batch
            state.epoch, state.micro_step = epoch, micro + 1
            if not acc.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            tracker.progress(state.step, total_steps)
            if state.step % config.logging.log_every == 0 or state.step == total_steps:
                tracker.log(step_metrics(meter, acc, scheduler, epoch, grad_norm, n_params), state.step)
                meter.reset()
            evaluate(evaluator.maybe_run)
            if stopped := stop_if_preempted():
                return stopped
            checkpointer.maybe_save(state)
        checkpointer.ensure_saved(state)
        evaluate(evaluator.finish)
        if stopped := stop_if_preempted():  # the requeued run evaluates (finish) and exports
            return stopped
        export_dir = run_dir / "model"
        export_model(acc, model, tokenizer, export_dir, data=config.data)
        sample = columns.batch(np.arange(min(8, len(columns))), pad_id)
        check_export(acc, model, sample, export_dir, tolerance=1e-4 if t.mixed_precision == "no" else 2e-2)
        tracker.finish(export_dir)
        return TrainResult(state.step, preempted=False, export_dir=export_dir)
    finally:
        preemption.restore()


__all__ = ["Evaluator", "NullEvaluator", "PeriodicEvaluator", "TrainResult", "train"]
