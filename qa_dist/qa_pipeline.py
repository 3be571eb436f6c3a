"""``pipeline("question-answering")`` for qa-dist's exported models, on every transformers version.

transformers 5.3 removed the question-answering pipeline (its ``pipeline()`` now raises "The task
question-answering has been removed"). Importing this module gives the task back, implemented with
qa-dist's own windowing and exact span search, unless the installed transformers still has its own:

    import qa_dist.qa_pipeline  # noqa: F401
    from transformers import pipeline

    qa = pipeline("question-answering", model="runs/cpu_sample_en/model")
    qa(question="Who?", context="...")  # {"score": ..., "start": ..., "end": ..., "answer": ...}

The call and the result follow the removed pipeline: ``question``/``context`` keywords, a dict or a
list of dicts; ``top_k``, ``max_answer_len``, ``max_seq_len``, ``doc_stride`` (by default the windows
the model was trained with where its directory records them, ``qa_dist_windows.json``),
``handle_impossible_answer``; ``score`` is the span's probability within its window (softmax of the
start logits times that of the end logits), ``start``/``end`` are character offsets in the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForQuestionAnswering, Pipeline, pipelines

from qa_dist.config import EvalConfig
from qa_dist.eval.postprocess import postprocess
from qa_dist.eval.run import default_windows
from qa_dist.features import build_eval_features

TASK = "question-answering"


@dataclass
class _Windows:
    """One question's windows, carried past the tensor-moving step of ``Pipeline.forward``."""

    example: dict
    features: dict


class QuestionAnsweringPipeline(Pipeline):
    """Extractive question answering over one context at a time, in as many windows as it needs."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __call__(
        self, *args: Any, question: str | list[str] | None = None, context: str | list[str] | None = None, **kwargs
    ):
        if question is not None or context is not None:
            if isinstance(question, list) or isinstance(context, list):
                questions = question if isinstance(question, list) else [question] * len(context)
                contexts = context if isinstance(context, list) else [context] * len(questions)
                if len(questions) != len(contexts):
                    raise ValueError("question and context lists must have the same length")
                args = ([{"question": q, "context": c} for q, c in zip(questions, contexts, strict=True)],)
            else:
                args = ({"question": question, "context": context},)
        return super().__call__(*args, **kwargs)

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        max_answer_len: int | None = None,
        max_seq_len: int | None = None,
        doc_stride: int | None = None,
        handle_impossible_answer: bool | None = None,
        **unknown: Any,
    ):
        if unknown:
            raise TypeError(f"unknown question-answering argument(s): {sorted(unknown)}")
        pre = {k: v for k, v in (("max_seq_len", max_seq_len), ("doc_stride", doc_stride)) if v is not None}
        post = {
            k: v
            for k, v in (
                ("top_k", top_k),
                ("max_answer_len", max_answer_len),
                ("handle_impossible_answer", handle_impossible_answer),
            )
            if v is not None
        }
        return pre, {}, post

    def _windows(self) -> dict[str, int]:
        """Default ``max_seq_len``/``doc_stride``: the windows the model directory records
        (``qa_dist_windows.json``, written with the export), else ``DataConfig``'s defaults."""
        if not hasattr(self, "_default_windows"):
            self._default_windows = default_windows(getattr(self.model, "name_or_path", None) or None)
        return self._default_windows

    def preprocess(self, inputs: dict, max_seq_len: int | None = None, doc_stride: int | None = None) -> dict:
        windows = self._windows()
        max_seq_len = windows["max_length"] if max_seq_len is None else max_seq_len
        doc_stride = windows["doc_stride"] if doc_stride is None else doc_stride
        question, context = inputs.get("question"), inputs.get("context")
        if not isinstance(question, str) or not question.strip() or not isinstance(context, str) or not context:
            raise ValueError("question-answering needs a non-empty `question` and `context` string")
        example = {"id": "0", "question": question, "context": context}
        features = build_eval_features([example], self.tokenizer, max_seq_len, min(doc_stride, max_seq_len // 2))
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in features]
        batch = self.tokenizer.pad({n: features[n] for n in names}, return_tensors="pt")
        return {"model_inputs": dict(batch), "windows": _Windows(example, features)}

    def _forward(self, inputs: dict) -> dict:
        with torch.no_grad():
            out = self.model(**inputs["model_inputs"])
        return {"start": out.start_logits.float(), "end": out.end_logits.float(), "windows": inputs["windows"]}

    def postprocess(
        self, outputs: dict, top_k: int = 1, max_answer_len: int = 15, handle_impossible_answer: bool = False
    ):
        windows = outputs["windows"]
        predictions = postprocess(
            [windows.example],
            windows.features,
            outputs["start"].cpu(),
            outputs["end"].cpu(),
            n_best_size=max(top_k, EvalConfig.n_best_size),
            max_answer_length=max_answer_len,
            version_2_with_negative=handle_impossible_answer,
        )
        answers = [
            {
                "score": math.exp(x["log_prob"]),
                "start": max(x["start"], 0),
                "end": max(x["end"], 0),
                "answer": x["text"],
            }
            for x in predictions.nbest["0"]
        ]
        # (with handle_impossible_answer the null answer is in the list at its own score)
        answers = answers[:top_k] or [{"score": 0.0, "start": 0, "end": 0, "answer": ""}]
        return answers[0] if top_k == 1 else answers


def register() -> bool:
    """Make ``pipeline("question-answering")`` build ``QuestionAnsweringPipeline`` when the installed
    transformers has no such task. Returns whether it registered."""
    if TASK in pipelines.SUPPORTED_TASKS:
        return False
    # transformers >= 5.3 lists the task as removed and refuses it before looking at the registry.
    getattr(pipelines, "REMOVED_TASKS", {}).pop(TASK, None)
    pipelines.PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=QuestionAnsweringPipeline, pt_model=AutoModelForQuestionAnswering, type="text"
    )
    return True


register()
