"""``qa-dist train``: one training run in whatever process group launched it."""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qa_dist.batches import FeatureColumns, epoch_plan
from qa_dist.config import RunConfig, config_to_dict, write_resolved_config
from qa_dist.dist import context_of, enable_tf32, make_accelerator, max_over_ranks, sum_over_ranks, to_device
from qa_dist.eval.hooks import Evaluator, NullEvaluator, PeriodicEvaluator
from qa_dist.models import enable_gradient_checkpointing, load_qa_model, load_tokenizer, parameter_count
from qa_dist.preemption import PREEMPTED_MARKER, PreemptionFlag, write_preempted_marker
from qa_dist.prepare import prepare_features
from qa_dist.train.checkpoint import BestKeeper, Checkpointer, TrainState
from qa_dist.train.export import check_export, export_model
from qa_dist.train.inference import batch_logits
from qa_dist.train.optim import make_optimizer, make_scheduler
from qa_dist.train.tracking import make_tracker, run_info, trackers_for

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


@dataclass
class TrainResult:
    steps: int
    preempted: bool
    export_dir: Path | None


class Meter:
    """This rank's samples, real tokens and loss since the last log line. Counts come from the CPU
    batch and the loss is summed on the device: nothing waits for the GPU until a log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.samples = self.tokens = 0
        self.loss_sum, self.loss_count = None, 0
        self.started = time.perf_counter()

    def add(self, cpu_batch: dict, loss: torch.Tensor) -> None:
        self.samples += int(cpu_batch["input_ids"].shape[0])
        self.tokens += int(cpu_batch["attention_mask"].sum())
        loss = loss.detach().double()  # float64, as the Python floats summed before
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.loss_count += 1

    def loss_total(self) -> float:
        """The device sum, read (a host sync) only here, at log steps."""
        return 0.0 if self.loss_sum is None else float(self.loss_sum)


def _fill_deepspeed_config(accelerator, config: RunConfig) -> None:
    """Values Accelerate would take from a prepared dataloader (ours is not) or fill with defaults."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = config.train.per_device_batch_size
    ds["gradient_accumulation_steps"] = config.train.gradient_accumulation_steps
    ds["train_batch_size"] = (
        config.train.per_device_batch_size * config.train.gradient_accumulation_steps * accelerator.num_processes
    )
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = config.train.max_grad_norm


def micro_batches(columns: FeatureColumns, config: RunConfig, rank: int, world: int, state: TrainState):
    """(epoch, micro_step, window indices) for this rank from the data position in ``state`` on."""
    t = config.train
    epoch, start = state.epoch, state.micro_step
    while True:
        plan = epoch_plan(
            columns.lengths,
            batch_size=t.per_device_batch_size,
            world_size=world,
            seed=t.seed,
            epoch=epoch,
            group_by_length=t.group_by_length,
        )
        usable = len(plan) // t.gradient_accumulation_steps * t.gradient_accumulation_steps
        if usable == 0:
            from qa_dist.errors import ConfigError

            raise ConfigError(
                f"{len(columns)} training windows do not fill one optimizer step of "
                f"{world} x {t.per_device_batch_size} x {t.gradient_accumulation_steps}"
            )
        for m in range(start, usable):
            yield epoch, m, plan[m, rank]
        epoch, start = epoch + 1, 0


def _step_metrics(meter: Meter, acc, scheduler, epoch: int, grad_norm, n_params: int) -> dict:
    """What is logged every log_every steps. Every rank calls this: the counts are summed over the
    ranks (length-grouped batches give the ranks different token counts)."""
    seconds = max(time.perf_counter() - meter.started, 1e-9)
    local = [meter.samples, meter.tokens, meter.loss_total(), meter.loss_count]
    samples, tokens, loss_sum, loss_count = sum_over_ranks(local, acc.device)
    metrics = {
        "loss": loss_sum / max(loss_count, 1),
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "lr": scheduler.get_last_lr()[0],
        "epoch": epoch,
    }
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    if acc.device.type == "cuda":
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if peak := gpu_peak_tflops():
            metrics["mfu"] = mfu(n_params, metrics["tokens_per_s"], acc.num_processes, peak)
    return metrics


def train(config: RunConfig, evaluator: Evaluator | None = None) -> TrainResult:
    t = config.train
    run_dir = Path(config.run_dir)
    acc = make_accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        timeout_seconds=t.collective_timeout,
        log_with=trackers_for(config, run_dir) or None,
        project_dir=str(run_dir),
        compile=t.compile,
    )
    cuda = acc.device.type == "cuda"
    if cuda and t.tf32:
        enable_tf32()
    from accelerate.utils import set_seed

    set_seed(t.seed)
    if acc.is_main_process:
        write_resolved_config(config)
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    tokenizer = load_tokenizer(config.model)
    prepared = prepare_features(config, tokenizer, context_of(acc), roles=("train",), progress=acc.is_main_process)
    columns = FeatureColumns.from_table(prepared["train"].entry.table("features"))
    steps_per_epoch = len(columns) // (t.per_device_batch_size * acc.num_processes) // t.gradient_accumulation_steps
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))

    model = load_qa_model(
        config.model, tokenizer=tokenizer, for_training=True, attn_implementation=t.attn_implementation
    )
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    n_params = parameter_count(model)
    sharded = acc.state.deepspeed_plugin is not None or acc.distributed_type.value == "FSDP"
    optimizer = make_optimizer(model, t, device_type=acc.device.type, sharded=sharded)
    scheduler = make_scheduler(optimizer, t, total_steps)
    _fill_deepspeed_config(acc, config)
    model, optimizer = acc.prepare(model, optimizer)
    # Not registered with Accelerate (it pickles registered objects and loads them with
    # weights_only=False): the checkpointer keeps the scheduler's state as JSON.

    if acc.is_main_process:
        print(
            f"training on {acc.num_processes} process(es) ({acc.distributed_type.value}, {acc.device.type}"
            f"{', gradient checkpointing' if t.gradient_checkpointing else ''}): {n_params / 1e6:,.1f}M parameters, "
            f"{len(columns):,} windows, {steps_per_epoch:,} optimizer steps per epoch, {total_steps:,} in all",
            file=sys.stderr,
            flush=True,
        )
    checkpointer = Checkpointer(acc, run_dir, t.checkpoint_every, t.keep_checkpoints, scheduler)
    state = checkpointer.restore(config.resume) or TrainState()
    tracker = make_tracker(acc, config, state, {**config_to_dict(config), "run": run_info(acc, config, n_params)})
    if evaluator is None and config.data.eval:
        from qa_dist.eval.evaluator import GatheredEvaluator

        evaluator = GatheredEvaluator(
            config, tokenizer, context_of(acc), lambda m, b: batch_logits(acc, m, b), acc.is_main_process
        )
    evaluator = evaluator or NullEvaluator()

    def export_best(out_dir: Path) -> None:  # train.keep_best: verified like the final export
        export_model(acc, model, tokenizer, out_dir, data=config.data)
        sample = columns.batch(np.arange(min(8, len(columns))), pad_id)
        check_export(acc, model, sample, out_dir, 1e-4 if t.mixed_precision == "no" else 2e-2, report_dir=out_dir)

    keeper = BestKeeper(acc, run_dir, t.keep_best, checkpointer, export_best) if t.keep_best else None
    preemption = PreemptionFlag()
    meter, pad_id = Meter(), tokenizer.pad_token_id or 0
    model.train()
    try:
        for epoch, micro, indices in micro_batches(columns, config, acc.process_index, acc.num_processes, state):
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
                tracker.log(_step_metrics(meter, acc, scheduler, epoch, grad_norm, n_params), state.step)
                meter.reset()
            metrics = None
            with preemption.evaluation():  # a signal stops it on every rank, at the same batch
                metrics = evaluator.maybe_run(state.step, model)
            if metrics is not None:
                tracker.log(metrics, state.step)
            if keeper is not None and getattr(evaluator, "last_step", None) == state.step:
                keeper.update(metrics, state)  # every rank: rank zero's metrics decide
            # Every rank learns whether any rank was signalled, so all save and stop together.
            if signum := max_over_ranks(preemption.signum, acc.device):
                checkpointer.save(state)
                if acc.is_main_process:
                    write_preempted_marker(run_dir, state.step, signal.Signals(signum).name)
                # No rank exits (75) before the marker exists: on several nodes srun's
                # --kill-on-bad-exit would otherwise end rank zero before it wrote it, and no requeue.
                acc.wait_for_everyone()
                tracker.finish()
                return TrainResult(state.step, preempted=True, export_dir=None)
            checkpointer.maybe_save(state)
        checkpointer.ensure_saved(state)
        metrics = None
        with preemption.evaluation():
            metrics = evaluator.finish(state.step, model)
        if metrics is not None:
            tracker.log(metrics, state.step)
        if keeper is not None:
            keeper.update(metrics, state)
        if signum := max_over_ranks(preemption.signum, acc.device):
            # The last checkpoint is this step's; the requeued run evaluates and exports.
            if acc.is_main_process:
                write_preempted_marker(run_dir, state.step, signal.Signals(signum).name)
            acc.wait_for_everyone()  # the marker first, as above
            tracker.finish()
            return TrainResult(state.step, preempted=True, export_dir=None)
        export_dir = run_dir / "model"
        export_model(acc, model, tokenizer, export_dir, data=config.data)
        sample = columns.batch(np.arange(min(8, len(columns))), pad_id)
        check_export(acc, model, sample, export_dir, tolerance=1e-4 if t.mixed_precision == "no" else 2e-2)
        tracker.finish(export_dir)
        return TrainResult(state.step, preempted=False, export_dir=export_dir)
    finally:
        preemption.restore()


__all__ = ["Evaluator", "NullEvaluator", "PeriodicEvaluator", "TrainResult", "mfu", "train"]
