"""Export a Hugging Face model directory, and check it against the model as trained."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoModelForQuestionAnswering

from qa_dist.config import DataConfig
from qa_dist.models import autocast_dtype, record_windows, stack_logits
from qa_dist.runtime.fsutil import atomic_write, atomic_write_bytes
from qa_dist.train.inference import LABELS, batch_logits

CHECK_LOGITS = "export_check_logits.safetensors"
"""The export check's batch (``inputs.*``) and the trained model's logits on it (``logits``)."""


def export_model(accelerator, model, tokenizer, out_dir: Path, data: DataConfig | None = None) -> None:
    """Config, safetensors weights and tokenizer files that ``from_pretrained`` and
    ``pipeline("question-answering")`` load, and the windows of ``data`` it was trained on. Every rank calls this: under ZeRO-3 the full weights
    are gathered collectively (stage3_gather_16bit_weights_on_model_save), or the export is empty."""
    # train.compile: Accelerate's get_state_dict keeps torch.compile's wrappers (1.15), whose names
    # gain "_orig_mod." (at the top, or inside each block under regional compilation), which
    # from_pretrained does not recognise: it would initialise every weight afresh. Dropped as
    # torch.distributed.checkpoint drops them. (Under ZeRO-3 only rank zero gets a dict: None elsewhere.)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        state_dict = {_without_compile_prefix(k): v for k, v in state_dict.items()}
        empty = [name for name, tensor in state_dict.items() if tensor.numel() == 0]
        if empty:
            raise RuntimeError(
                f"export would hold empty tensors ({empty[:3]}...): enable "
                "stage3_gather_16bit_weights_on_model_save in the DeepSpeed config"
            )
        accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(
            str(out_dir),
            state_dict=state_dict,
            safe_serialization=True,
            is_main_process=True,
        )
        tokenizer.save_pretrained(str(out_dir))
        if data is not None:  # predict and the pipeline use them: no model trained at 128 run at 384
            record_windows(out_dir, data.max_length, data.doc_stride)
    accelerator.wait_for_everyone()


def _without_compile_prefix(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


@contextlib.contextmanager
def _without_zero3_init():
    """Under ZeRO-3, transformers builds every model inside deepspeed.zero.Init, whose collectives
    rank zero cannot run alone. Accelerate's zero3_init_context_manager(enable=False) leaves
    transformers' registered config in place (1.15), so unregister it for this one load."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    registered = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


@torch.no_grad()
def check_export(
    accelerator, model, batch: dict, out_dir: Path, tolerance: float, report_dir: Path | None = None
) -> dict:
    """Logits of the trained model (inside its wrapper) against the exported directory's, on one
    batch. Every rank runs the forward (ZeRO-3 gathers parameters collectively); rank zero loads the
    export on the CPU and compares. ``tolerance`` is relative to the largest trained logit (at
    least 1): a wrong or empty export is off by about the logits themselves, while bf16/fp16 runs
    differ by their rounding, which grows with the logits. Writes ``export_check.json`` and
    ``export_check_logits.safetensors`` (the batch's inputs and the trained logits) to ``report_dir`` (default: ``out_dir``'s parent) and raises on a
    mismatch."""
    report_dir = Path(out_dir).parent if report_dir is None else Path(report_dir)
    trained = batch_logits(accelerator, model, batch).cpu()
    inputs = {k: v.cpu() for k, v in batch.items() if k not in LABELS}
    report = {}
    if accelerator.is_main_process:
        with _without_zero3_init():
            exported = AutoModelForQuestionAnswering.from_pretrained(str(out_dir)).eval()
        # The same reduced precision as the trained forward, so the check compares like with like
        # (on the CPU: a model that needed ZeRO-3 may not fit one GPU whole).
        dtype = autocast_dtype(str(accelerator.mixed_precision))
        with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
            again = exported(**inputs)
        loaded = stack_logits(again)
        tensors = {"logits": trained.contiguous(), **{f"inputs.{k}": v.contiguous() for k, v in inputs.items()}}
        atomic_write_bytes(report_dir / CHECK_LOGITS, safetensors.torch.save(tensors))
        report = {
            "max_abs_diff": float((loaded - trained).abs().max()),
            "scale": max(1.0, float(trained.abs().max())),
            "tolerance": tolerance,
            "windows": int(trained.shape[1]),
        }
        atomic_write(report_dir / "export_check.json", json.dumps(report, indent=2))
        if report["max_abs_diff"] > tolerance * report["scale"]:
            raise RuntimeError(f"exported model disagrees with the trained one: {report}")
    accelerator.wait_for_everyone()
    return report
