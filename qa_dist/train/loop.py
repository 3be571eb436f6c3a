"""``qa-dist train``: one training run in whatever process group launched it.

``train`` builds the run (``qa_dist.train.setup``) and runs the loop below: a step, the evaluator's
``maybe_run``, the preemption check and the checkpointer's ``maybe_save``, each a component that
owns its policy. Every rank runs every line; the comments say where that matters."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qa_dist.config import RunConfig
from qa_dist.eval.hooks import Evaluator, NullEvaluator, PeriodicEvaluator
from qa_dist.features.batches import micro_batches
from qa_dist.runtime import ranks
from qa_dist.runtime.dist import max_over_ranks, to_device
from qa_dist.runtime.preemption import PreemptionFlag, write_preempted_marker
from qa_dist.train.setup import Run, build_run
from qa_dist.train.tracking import Meter, step_metrics


@dataclass
class TrainResult:
    steps: int
    preempted: bool
    export_dir: Path | None


class Preempted(Exception):
    """Raised out of the loop once every rank has checkpointed on a signal."""


def train(config: RunConfig, evaluator: Evaluator | None = None, trackers: Sequence = ()) -> TrainResult:
    """One training run in the process group that launched it; every rank calls this. ``evaluator``
    replaces the gathered EM/F1 evaluation of ``data.eval``; ``trackers``: your own
    ``accelerate.tracking.GeneralTracker`` instances beside ``logging.trackers`` (Accelerate calls
    them on the main process only): they get the resolved config and every logged scalar."""
    if evaluator is None:
        config.check_keep_best()
    run = build_run(config, evaluator, trackers)
    try:
        trainer = Trainer(run)
        recorded = ranks.record(run.run_dir)  # its handler installed: a notice now checkpoints
        try:
            return trainer.run_to_end()
        finally:
            ranks.forget(recorded)
            trainer.preemption.restore()
    finally:
        run.release()


class Trainer:
    """The loop over one run's micro-batches; every rank drives one."""

    def __init__(self, run: Run) -> None:
        self.run, self.state = run, run.state
        self.meter = Meter()
        self.preemption = PreemptionFlag()

    def run_to_end(self) -> TrainResult:
        """A stopped evaluation first, the loop, the last checkpoint and evaluation, the export."""
        run, state = self.run, self.state
        try:
            if state.eval_pending:  # the checkpointed step's evaluation, which a preemption stopped
                state.eval_pending = False
                with self.meter.paused("eval"):
                    self.evaluate(run.evaluator.maybe_run)
            self.fit()
            run.checkpointer.ensure_saved(state)
            self.evaluate(run.evaluator.finish)  # a requeued run evaluates (finish) and exports
            export_dir = run.run_dir / "model"
            run.export(export_dir, report_dir=run.run_dir)
            run.tracker.finish(export_dir)
            return TrainResult(state.step, preempted=False, export_dir=export_dir)
        except Preempted:
            return TrainResult(state.step, preempted=True, export_dir=None)

    def fit(self) -> None:
        run, state, t = self.run, self.state, self.run.config.train
        run.model.train()
        rank, world = run.acc.process_index, run.acc.num_processes
        positions = micro_batches(run.columns.lengths, t, rank, world, epoch=state.epoch, micro_step=state.micro_step)
        for epoch, micro, indices in positions:
            if state.step >= run.total_steps:
                return
            grad_norm = self.micro_step(indices)
            state.epoch, state.micro_step = epoch, micro + 1
            if not run.acc.sync_gradients:
                continue
            run.scheduler.step()
            state.step += 1
            run.tracker.progress(state.step, run.total_steps)
            if state.step % run.config.logging.log_every == 0 or state.step == run.total_steps:
                metrics = step_metrics(self.meter, run.acc, run.scheduler, epoch, grad_norm, run.n_params)
                run.tracker.log(metrics, state.step)
                self.meter.reset()
            with self.meter.paused("eval"):
                self.evaluate(run.evaluator.maybe_run)
            with self.meter.paused("checkpoint"):
                run.checkpointer.maybe_save(state)

    def micro_step(self, indices):
        """Forward, backward and (on the accumulation's last micro-batch) the optimizer step; the
        gradient norm where it was clipped."""
        run, t = self.run, self.run.config.train
        cpu_batch = run.columns.batch(indices, run.pad_id)
        cuda = run.acc.device.type == "cuda"
        batch = to_device(cpu_batch, run.acc.device, pin_memory=cuda and t.pin_memory)
        grad_norm = None
        with run.acc.accumulate(run.model):
            loss = run.model(**batch).loss
            run.acc.backward(loss)
            if run.acc.sync_gradients and t.max_grad_norm:
                grad_norm = run.acc.clip_grad_norm_(run.model.parameters(), t.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad()
        self.meter.add(cpu_batch, loss)  # no .item(): no host sync per micro-batch
        return grad_norm

    def evaluate(self, run_evaluator) -> None:
        """The evaluator's ``maybe_run`` or ``finish`` at this step, then the preemption check (a
        signal stops the evaluation on every rank at the same batch). Every rank calls this."""
        run, state = self.run, self.state
        metrics = None  # stays None when a signal stops the evaluation (the context swallows the stop)
        with self.preemption.evaluation():
            metrics = run_evaluator(state.step, run.model)
        if metrics is not None:
            run.tracker.log(metrics, state.step)
        # Every rank, after each evaluation (any step, for an evaluator that does not say when it
        # last ran): rank zero's metrics decide.
        if run.keeper is not None and getattr(run.evaluator, "last_step", state.step) == state.step:
            run.keeper.update(metrics, state)
        self.stop_if_preempted()

    def stop_if_preempted(self) -> None:
        """Every rank learns whether any rank was signalled, so all save and stop together (raising
        ``Preempted``). A step already checkpointed (the last, or the one resumed from) is not saved
        again."""
        run, state = self.run, self.state
        if not (signum := max_over_ranks(self.preemption.signum, run.acc.device)):
            return
        state.eval_pending = self.preemption.stopped_evaluation
        run.checkpointer.ensure_saved(state)
        write_preempted_marker(run.report, run.run_dir, state.step, signal.Signals(signum).name)
        # No rank exits (75) before the marker exists: on several nodes srun's --kill-on-bad-exit
        # would otherwise end rank zero before it wrote it, and no requeue.
        run.acc.wait_for_everyone()
        run.tracker.finish()
        raise Preempted


__all__ = ["Evaluator", "NullEvaluator", "PeriodicEvaluator", "TrainResult", "train"]
