"""A custom metrics tracker, through Accelerate's own tracker API.

qa-dist has no hook for a tracker of your own yet: ``qa-dist train`` logs to the console, wandb
and TensorBoard (``logging.trackers``). Accelerate's API is what such a hook would take: subclass
``accelerate.tracking.GeneralTracker`` (``name``, ``requires_logging_directory``, ``tracker``,
``store_init_configuration``, ``log``, ``finish``) and pass an instance in
``Accelerator(log_with=[...])``; ``init_trackers``, ``log`` and ``end_training`` call it on the
main process only. Here it writes JSON Lines, in a short Accelerate loop over qa-dist's features.

Offline, on the Chinese sample shipped with qa-dist (a 2-layer BERT made from a config, qa-dist's
character tokenizer), a few seconds on a CPU:

    python examples/custom_tracker.py --max-steps 6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, on_main_process
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering, DataCollatorWithPadding

import qa_dist
from qa_dist.models import resolve_model_path


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
    parser.add_argument("--out", default="runs/examples/custom_tracker", help="where the tracker writes")
    args = parser.parse_args()

    tracker = JsonLinesTracker("train", args.out)
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    hyperparameters = {"lr": 1e-3, "max_steps": args.max_steps, "max_length": 128, "doc_stride": 32}
    accelerator.init_trackers("qa-dist-example", config=hyperparameters)

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sample:zh-char-tokenizer"))
    model = BertForQuestionAnswering(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
        )
    )
    features = qa_dist.build_train_features(
        qa_dist.load_examples("sample:zh-train"), tokenizer, max_length=128, doc_stride=32
    )
    columns = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in features]
    rows = [
        {k: features[k][i] for k in (*columns, "start_positions", "end_positions")}
        for i in range(len(features["input_ids"]))
    ]
    loader = DataLoader(rows, batch_size=16, shuffle=True, collate_fn=DataCollatorWithPadding(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=hyperparameters["lr"])
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    step = 0
    while step < args.max_steps:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            accelerator.log({"train/loss": loss.item()}, step=step)  # reaches JsonLinesTracker.log
            if step == args.max_steps:
                break
    accelerator.end_training()  # JsonLinesTracker.finish

    if accelerator.is_main_process:
        records = [json.loads(line) for line in tracker.path.read_text().splitlines()]
        print(f"tracker wrote {len(records)} records to {tracker.path}; last: {records[-1]}")


if __name__ == "__main__":
    main()
