"""Batches for training and evaluation: pure functions over the memory-mapped feature columns.

Windows are stored unpadded; each batch is padded to its own longest window. For training, windows
of similar length are grouped into the same step (a 384-token window of SQuAD holds about 150 real
tokens on average, so padding every window to 384 would spend most of the compute on padding).
The epoch plan depends only on (seed, epoch), so a resumed run replays exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from qa_dist.config import TrainConfig

_PAD_VALUES = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0}


@dataclass(frozen=True)
class FeatureColumns:
    """Numpy views (no copy) of a features table: per chunk (a shard of the cache entry) its flat
    token values, per window its chunk, its start in that chunk's values and its length."""

    chunk: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    values: dict[str, list[np.ndarray]]
    scalars: dict[str, np.ndarray]
    """One number per window (labels, example index): small, so joined across chunks."""

    @classmethod
    def from_table(cls, table: pa.Table) -> FeatureColumns:
        if "input_ids" not in table.column_names:
            raise ValueError("features table has no input_ids column")
        values: dict[str, list[np.ndarray]] = {}
        scalars: dict[str, list[np.ndarray]] = {}
        chunk, starts, lengths = [], [], []
        for c, batch in enumerate(table.to_batches()):
            for name in batch.schema.names:
                array = batch.column(name)
                if name in _PAD_VALUES:
                    values.setdefault(name, []).append(array.values.to_numpy(zero_copy_only=False))
                elif pa.types.is_integer(array.type):
                    scalars.setdefault(name, []).append(array.to_numpy())
            offsets = batch.column("input_ids").offsets.to_numpy()
            base = offsets[0]  # (a sliced batch's values start at its first offset)
            if base:
                for name in values:
                    values[name][-1] = values[name][-1][base:]
            chunk.append(np.full(len(offsets) - 1, c, dtype=np.int32))
            starts.append(offsets[:-1] - base)
            lengths.append(np.diff(offsets))
        empty = np.zeros(0, dtype=np.int64)
        return cls(
            chunk=np.concatenate(chunk) if chunk else empty.astype(np.int32),
            starts=np.concatenate(starts) if starts else empty,
            lengths=np.concatenate(lengths) if lengths else empty,
            values=values,
            scalars={name: np.concatenate(parts) for name, parts in scalars.items()},
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, indices: np.ndarray, pad_token_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Padded tensors for the windows ``indices`` (padded to the longest, or to ``pad_to``)."""
        lengths = self.lengths[indices]
        width = int(pad_to or lengths.max())
        batch = {}
        for name, chunks in self.values.items():
            pad = pad_token_id if name == "input_ids" else _PAD_VALUES[name]
            out = np.full((len(indices), width), pad, dtype=np.int64)
            for row, (i, n) in enumerate(zip(indices, lengths, strict=True)):
                start = self.starts[i]
                out[row, :n] = chunks[self.chunk[i]][start : start + n]
            batch[name] = torch.from_numpy(out)
        for name, column in self.scalars.items():
            if name in ("start_positions", "end_positions"):
                batch[name] = torch.from_numpy(column[indices].astype(np.int64))
        return batch


def epoch_plan(
    lengths: np.ndarray,
    *,
    batch_size: int,
    world_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    chunk_steps: int = 50,
) -> np.ndarray:
    """Window indices of one epoch, shaped ``[steps, world_size, batch_size]``.

    Step ``s`` gives rank ``r`` the micro-batch ``plan[s, r]``. The windows are shuffled with
    (seed, epoch); with ``group_by_length`` each run of ``chunk_steps`` steps is sorted by length,
    so the micro-batches of one step, which run side by side on the ranks, are of similar length
    too, and the steps are shuffled again, the longest step first (an out-of-memory shows at once).
    Windows that do not fill a whole last step are left out of this epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    per_step = batch_size * world_size
    steps = len(lengths) // per_step
    order = rng.permutation(len(lengths))[: steps * per_step]
    if not group_by_length:
        return order.reshape(steps, world_size, batch_size)
    chunk = per_step * chunk_steps
    for lo in range(0, len(order), chunk):
        part = order[lo : lo + chunk]
        order[lo : lo + chunk] = part[np.argsort(-lengths[part], kind="stable")]
    plan = order.reshape(steps, world_size, batch_size)
    plan = plan[rng.permutation(steps)]
    longest = int(np.argmax(lengths[plan].max(axis=(1, 2)))) if steps else 0
    plan[[0, longest]] = plan[[longest, 0]]
    return plan


def micro_batches(
    lengths: np.ndarray, train: TrainConfig, rank: int, world_size: int, *, epoch: int = 0, micro_step: int = 0
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(epoch, micro_step, window indices) for ``rank``, endlessly, from the data position
    (``epoch``, ``micro_step``) on: a resumed run continues inside its epoch's plan."""
    train.steps_per_epoch(len(lengths), world_size)
    start = micro_step
    while True:
        plan = epoch_plan(
            lengths,
            batch_size=train.per_device_batch_size,
            world_size=world_size,
            seed=train.seed,
            epoch=epoch,
            group_by_length=train.group_by_length,
        )
        usable = len(plan) // train.gradient_accumulation_steps * train.gradient_accumulation_steps
        for m in range(start, usable):
            yield epoch, m, plan[m, rank]
        epoch, start = epoch + 1, 0


def eval_plan(lengths: np.ndarray, *, batch_size: int, world_size: int, rank: int) -> list[tuple[np.ndarray, bool]]:
    """This rank's evaluation batches: ``(window indices, is_padding)``.

    The windows are sorted by length (longest first) and cut into batches that do not depend on the
    number of processes, so every window is scored in the same batch (the same padded shape, hence
    bit-identical logits) with 1, 2 or 3 processes; batch ``b`` goes to rank ``b % world_size``.
    Every rank runs the same number of forwards (under ZeRO-3 each forward is a collective): a rank
    short of batches repeats batch 0 and marks it padding, to be dropped.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rounds = -(-len(batches) // world_size) if batches else 0
    plan = []
    for r in range(rounds):
        b = r * world_size + rank
        plan.append((batches[b], False) if b < len(batches) else (batches[0], True))
    return plan
