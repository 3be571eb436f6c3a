"""Reading a run's TensorBoard event files back, for the tests that check what was logged."""

from __future__ import annotations

from pathlib import Path


def tensorboard_events(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def scalar_steps(events, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]
