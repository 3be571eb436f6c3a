"""A tracker of your own, passed to ``qa_dist.train.train(config, trackers=[...])``.

qa-dist logs to the console, wandb and TensorBoard (``logging.trackers``). Anything else plugs in
through Accelerate's own tracker API: subclass ``accelerate.tracking.GeneralTracker`` (``name``,
``requires_logging_directory``, ``tracker``, ``store_init_configuration``, ``log``, ``finish``) and
pass instances to ``train``. They go into ``Accelerator(log_with=[...])`` beside the configured
ones, so Accelerate calls them on the main process only; they receive the resolved run config once
and every scalar the run logs (the step lines, and each evaluation's ``eval/`` numbers). Here:
JSON Lines.

Offline, on the Chinese sample shipped with qa-dist (a 2-layer BERT from scratch, character
tokenizer), about 20 s on a CPU:

    python examples/custom_tracker.py --max-steps 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process

import qa_dist
from qa_dist.config import load_config
from qa_dist.train import train

RECIPE = Path(qa_dist.__file__).parent / "configs" / "runs" / "cpu_sample_zh.yaml"


class JsonLinesTracker(GeneralTracker):
    """One JSON object per line: the run's config first, then each ``log`` call with its step."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path) -> None:
        super().__init__()
        self.path = Path(logging_dir) / f"{run_name}.jsonl"
        self.file = None

    @on_main_process
    def start(self) -> None:  # called by init_trackers (Accelerate >= 1.5; earlier: do this in __init__)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("w", encoding="utf-8")

    @property
    def tracker(self):
        return self.file

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        self._write({"config": values})

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self._write({"step": step, **values})

    @on_main_process
    def finish(self) -> None:
        self.file.close()

    def _write(self, record: dict) -> None:
        if self.file is None:  # Accelerate < 1.5 has no start()
            self.start()
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=20, help="optimizer steps to train")
    parser.add_argument("--out", default="runs/examples/custom_tracker", help="run directory")
    args = parser.parse_args()

    out = Path(args.out)
    config = load_config(
        RECIPE,
        [
            f"run_dir={out}",
            f"data.cache_dir={out / 'cache'}",
            f"train.max_steps={args.max_steps}",
            "logging.log_every=2",
            "eval.every=0",  # evaluate once, at the end
        ],
    )
    tracker = JsonLinesTracker("train", out / "jsonl")
    result = train(config, trackers=[tracker])
    if tracker.path.exists():  # the main process
        records = [json.loads(line) for line in tracker.path.read_text().splitlines()]
        steps = [r["step"] for r in records[1:]]
        f1 = next((r["eval/F1"] for r in records if "eval/F1" in r), None)
        if "config" not in records[0] or f1 is None:
            raise SystemExit(f"{tracker.path}: the config or the evaluation did not reach the tracker")
        print(
            f"trained {result.steps} steps; tracker wrote {len(records)} records to {tracker.path} "
            f"(the config, then steps {steps}); eval/F1 {f1:.2f}"
        )


if __name__ == "__main__":
    main()
