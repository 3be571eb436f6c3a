"""``qa-dist evaluate`` and ``qa-dist predict``: evaluation outside training, in whatever process
group launched it (or one process). Each rank holds the whole fine-tuned model (a QA encoder fits
one device) and scores its share of the windows."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from qa_dist.config import EvalConfig, ModelConfig, RunConfig
from qa_dist.dist import DistContext, current_context
from qa_dist.errors import ConfigError
from qa_dist.eval.evaluator import EvalData, EvalResult, Forward, evaluate
from qa_dist.models import load_qa_model, load_tokenizer


def device_for(dist: DistContext) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def model_forward(model, device: torch.device, mixed_precision: str = "no") -> Forward:
    """Logits of a plain (unwrapped) model, under autocast on GPUs when asked."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype and device.type == "cuda" else nullcontext()

    @torch.no_grad()
    def forward(batch: dict) -> torch.Tensor:
        with autocast:
            out = model(**{k: v.to(device) for k, v in batch.items()})
        return torch.stack([out.start_logits, out.end_logits]).float()

    return forward


def evaluate_run(config: RunConfig, out_dir: Path | None = None, progress: bool = True) -> EvalResult | None:
    """Evaluate ``config.model`` on ``config.data.eval``; rank zero returns the result."""
    from qa_dist.prepare import prepare_features

    if not config.data.eval:
        raise ConfigError("nothing to evaluate: set data.eval")
    dist = current_context(init=True)
    tokenizer = load_tokenizer(config.model)
    entry = prepare_features(config, tokenizer, dist, roles=("eval",), progress=progress and dist.rank == 0)[
        "eval"
    ].entry
    device = device_for(dist)
    model = load_qa_model(config.model).to(device).eval()
    return evaluate(
        model_forward(model, device, config.train.mixed_precision),
        EvalData(entry.table("features"), entry.table("examples")),
        dist,
        config.eval,
        out_dir or Path(config.run_dir) / "eval" / "evaluate",
        pad_token_id=tokenizer.pad_token_id or 0,
        progress=progress,
    )


def predict(
    model_path: str,
    examples: list[dict],
    out_dir: Path | None,
    *,
    max_length: int = 384,
    doc_stride: int = 128,
    config: EvalConfig | None = None,
    progress: bool = False,
) -> EvalResult | None:
    """Predict answers to ``examples`` (gold answers not needed); rank zero returns the result."""
    from qa_dist.features import build_eval_features
    from qa_dist.prepare import examples_table, features_table

    config = config or EvalConfig()
    dist = current_context(init=True)
    model_config = ModelConfig(name_or_path=model_path)
    tokenizer = load_tokenizer(model_config)
    device = device_for(dist)
    model = load_qa_model(model_config).to(device).eval()
    features = build_eval_features(examples, tokenizer, max_length, doc_stride)
    return evaluate(
        model_forward(model, device),
        EvalData(features_table(features), examples_table(examples)),
        dist,
        config,
        out_dir,
        pad_token_id=tokenizer.pad_token_id or 0,
        labelled=False,
        progress=progress,
    )
