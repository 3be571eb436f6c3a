"""The code the benchmarks compare qa-dist against: the tutorials' own code, in one place.

Where it comes from:

- ``prepare_train_features``, ``prepare_validation_features`` and ``postprocess_qa_predictions``:
  the Hugging Face question-answering notebook (``notebooks/examples/question_answering.ipynb``),
  whose feature functions ``examples/pytorch/question-answering/run_qa.py`` repeats;
- ``run_qa_postprocess_qa_predictions``: ``postprocess_qa_predictions`` of transformers'
  ``examples/pytorch/question-answering/utils_qa.py``, what ``run_qa.py`` evaluates with;
- ``length_grouping``, ``warmup_ratio``: ``run_qa.py``'s ``--group_by_length`` and
  ``--warmup_ratio``, in the keywords of the installed transformers' ``TrainingArguments``;
- ``bare_loop``: the plainest PyTorch training loop, with no framework around it.

The code is kept as the tutorials write it, on purpose: it is the baseline, so its per-window
Python loops, its padding to ``max_length`` and its known slips (commented where they matter) stay.
What differs from the originals is only what a benchmark needs to call them: the tokenizer and the
lengths are parameters instead of notebook globals, the notebook's loop is fixed to SQuAD v2 mode and
also returns each question's best span, and the logging, progress bars and file writing are left out.
The benchmarks are run as scripts (``python bench/x.py``), which puts ``bench/`` on ``sys.path``:
``from baselines import ...``.
"""

from __future__ import annotations

import collections
import time

import numpy as np


def prepare_train_features(examples, tokenizer, max_length: int, doc_stride: int, padding="max_length"):
    """The notebook's training features: overflowing windows, labels from a per-window Python loop.

    ``padding``: the notebook's ``"max_length"``, or ``False`` for ``run_qa.py`` with
    ``--pad_to_max_length false`` (its ``DataCollatorWithPadding`` pads each batch)."""
    pad_on_right = tokenizer.padding_side == "right"
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized_examples = tokenizer(
        examples["question" if pad_on_right else "context"],
        examples["context" if pad_on_right else "question"],
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=padding,
    )
    sample_mapping = tokenized_examples.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized_examples.pop("offset_mapping")
    tokenized_examples["start_positions"] = []
    tokenized_examples["end_positions"] = []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized_examples["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id)
        sequence_ids = tokenized_examples.sequence_ids(i)
        sample_index = sample_mapping[i]
        answers = examples["answers"][sample_index]
        if len(answers["answer_start"]) == 0:
            tokenized_examples["start_positions"].append(cls_index)
            tokenized_examples["end_positions"].append(cls_index)
        else:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            token_start_index = 0
            while sequence_ids[token_start_index] != (1 if pad_on_right else 0):
                token_start_index += 1
            token_end_index = len(input_ids) - 1
            while sequence_ids[token_end_index] != (1 if pad_on_right else 0):
                token_end_index -= 1
            if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
                tokenized_examples["start_positions"].append(cls_index)
                tokenized_examples["end_positions"].append(cls_index)
            else:
                # (When the answer ends on the window's last context token, this loop runs on into
                # [SEP] and the padding, whose offsets are (0, 0), and labels one of them.)
                while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                    token_start_index += 1
                tokenized_examples["start_positions"].append(token_start_index - 1)
                while offsets[token_end_index][1] >= end_char:
                    token_end_index -= 1
                tokenized_examples["end_positions"].append(token_end_index + 1)
    return tokenized_examples


def prepare_validation_features(examples, tokenizer, max_length: int, doc_stride: int):
    """The notebook's validation features: padded to ``max_length``, each window's example id, and
    offsets outside the context set to None."""
    pad_on_right = tokenizer.padding_side == "right"
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized_examples = tokenizer(
        examples["question" if pad_on_right else "context"],
        examples["context" if pad_on_right else "question"],
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    sample_mapping = tokenized_examples.pop("overflow_to_sample_mapping")
    tokenized_examples["example_id"] = []
    for i in range(len(tokenized_examples["input_ids"])):
        sequence_ids = tokenized_examples.sequence_ids(i)
        context_index = 1 if pad_on_right else 0
        sample_index = sample_mapping[i]
        tokenized_examples["example_id"].append(examples["id"][sample_index])
        tokenized_examples["offset_mapping"][i] = [
            (o if sequence_ids[k] == context_index else None)
            for k, o in enumerate(tokenized_examples["offset_mapping"][i])
        ]
    return tokenized_examples


def postprocess_qa_predictions(
    examples, features, all_start_logits, all_end_logits, tokenizer, n_best_size=20, max_answer_length=30
):
    """The notebook's loop, SQuAD v2 mode: the 20 best starts x 20 best ends of every window. It also
    returns each example's best span text and score, for the benchmarks' agreement check. (Its
    ``min_null_score`` keeps the maximum over the windows, a known slip of the notebook; qa-dist
    takes the minimum.)"""
    example_id_to_index = {k: i for i, k in enumerate(examples["id"])}
    features_per_example = collections.defaultdict(list)
    for i, feature in enumerate(features):
        features_per_example[example_id_to_index[feature["example_id"]]].append(i)
    predictions, best_spans = collections.OrderedDict(), {}
    for example_index, example in enumerate(examples):
        feature_indices = features_per_example[example_index]
        min_null_score = None
        valid_answers = []
        context = example["context"]
        for feature_index in feature_indices:
            start_logits = all_start_logits[feature_index]
            end_logits = all_end_logits[feature_index]
            offset_mapping = features[feature_index]["offset_mapping"]
            cls_index = features[feature_index]["input_ids"].index(tokenizer.cls_token_id)
            feature_null_score = start_logits[cls_index] + end_logits[cls_index]
            if min_null_score is None or min_null_score < feature_null_score:
                min_null_score = feature_null_score
            start_indexes = np.argsort(start_logits)[-1 : -n_best_size - 1 : -1].tolist()
            end_indexes = np.argsort(end_logits)[-1 : -n_best_size - 1 : -1].tolist()
            for start_index in start_indexes:
                for end_index in end_indexes:
                    if (
                        start_index >= len(offset_mapping)
                        or end_index >= len(offset_mapping)
                        or offset_mapping[start_index] is None
                        or offset_mapping[end_index] is None
                    ):
                        continue
                    if end_index < start_index or end_index - start_index + 1 > max_answer_length:
                        continue
                    start_char = offset_mapping[start_index][0]
                    end_char = offset_mapping[end_index][1]
                    valid_answers.append(
                        {
                            "score": start_logits[start_index] + end_logits[end_index],
                            "text": context[start_char:end_char],
                        }
                    )
        if len(valid_answers) > 0:
            best_answer = sorted(valid_answers, key=lambda x: x["score"], reverse=True)[0]
        else:
            best_answer = {"text": "", "score": 0.0}
        answer = best_answer["text"] if best_answer["score"] > min_null_score else ""
        predictions[example["id"]] = answer
        best_spans[example["id"]] = (best_answer["text"], float(best_answer["score"]))
    return predictions, best_spans


def run_qa_postprocess_qa_predictions(
    examples, features, all_start_logits, all_end_logits, n_best_size=20, max_answer_length=30
):
    """utils_qa.py's ``postprocess_qa_predictions``, SQuAD v2 mode, without its logging and file
    writing: the same three outputs as ``qa_dist.postprocess`` (answers, n-best lists with
    probabilities, null odds)."""
    example_id_to_index = {k: i for i, k in enumerate(examples["id"])}
    features_per_example = collections.defaultdict(list)
    for i, feature in enumerate(features):
        features_per_example[example_id_to_index[feature["example_id"]]].append(i)
    all_predictions, all_nbest_json, scores_diff_json = {}, {}, {}
    for example_index, example in enumerate(examples):
        feature_indices = features_per_example[example_index]
        min_null_prediction = None
        prelim_predictions = []
        for feature_index in feature_indices:
            start_logits = all_start_logits[feature_index]
            end_logits = all_end_logits[feature_index]
            offset_mapping = features[feature_index]["offset_mapping"]
            feature_null_score = start_logits[0] + end_logits[0]
            if min_null_prediction is None or min_null_prediction["score"] > feature_null_score:
                min_null_prediction = {
                    "offsets": (0, 0),
                    "score": feature_null_score,
                    "start_logit": start_logits[0],
                    "end_logit": end_logits[0],
                }
            start_indexes = np.argsort(start_logits)[-1 : -n_best_size - 1 : -1].tolist()
            end_indexes = np.argsort(end_logits)[-1 : -n_best_size - 1 : -1].tolist()
            for start_index in start_indexes:
                for end_index in end_indexes:
                    if (
                        start_index >= len(offset_mapping)
                        or end_index >= len(offset_mapping)
                        or offset_mapping[start_index] is None
                        or len(offset_mapping[start_index]) < 2
                        or offset_mapping[end_index] is None
                        or len(offset_mapping[end_index]) < 2
                    ):
                        continue
                    if end_index < start_index or end_index - start_index + 1 > max_answer_length:
                        continue
                    prelim_predictions.append(
                        {
                            "offsets": (offset_mapping[start_index][0], offset_mapping[end_index][1]),
                            "score": start_logits[start_index] + end_logits[end_index],
                            "start_logit": start_logits[start_index],
                            "end_logit": end_logits[end_index],
                        }
                    )
        prelim_predictions.append(min_null_prediction)
        null_score = min_null_prediction["score"]
        predictions = sorted(prelim_predictions, key=lambda x: x["score"], reverse=True)[:n_best_size]
        if not any(p["offsets"] == (0, 0) for p in predictions):
            predictions.append(min_null_prediction)
        context = example["context"]
        for pred in predictions:
            offsets = pred.pop("offsets")
            pred["text"] = context[offsets[0] : offsets[1]]
        if len(predictions) == 0 or (len(predictions) == 1 and predictions[0]["text"] == ""):
            predictions.insert(0, {"text": "empty", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0})
        scores = np.array([pred.pop("score") for pred in predictions])
        exp_scores = np.exp(scores - np.max(scores))
        probs = exp_scores / exp_scores.sum()
        for prob, pred in zip(probs, predictions, strict=True):
            pred["probability"] = prob
        i = 0
        while predictions[i]["text"] == "":
            i += 1
        best_non_null_pred = predictions[i]
        score_diff = null_score - best_non_null_pred["start_logit"] - best_non_null_pred["end_logit"]
        scores_diff_json[example["id"]] = float(score_diff)
        all_predictions[example["id"]] = "" if score_diff > 0.0 else best_non_null_pred["text"]
        all_nbest_json[example["id"]] = [
            {k: (float(v) if isinstance(v, (np.float16, np.float32, np.float64)) else v) for k, v in pred.items()}
            for pred in predictions
        ]
    return all_predictions, all_nbest_json, scores_diff_json


def length_grouping(training_arguments) -> dict:
    """``run_qa.py --group_by_length``: the ``TrainingArguments`` keyword for it in the installed
    transformers (newer versions name it ``train_sampling_strategy``)."""
    if "train_sampling_strategy" in training_arguments.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def warmup_ratio(training_arguments, ratio: float) -> dict:
    """``run_qa.py --warmup_ratio``: the ``TrainingArguments`` keyword for it in the installed
    transformers (from version 5 on, ``warmup_steps`` below 1 is the ratio)."""
    if "warmup_ratio" in training_arguments.__dataclass_fields__:
        return {"warmup_ratio": ratio}
    return {"warmup_steps": ratio}


def bare_loop(model_dir: str, columns, plan, pad_id: int, pad_to: int | None, lr: float, seed: int) -> list[float]:
    """Seconds per step of the plainest training loop over ``plan`` (a list of index arrays): batch,
    forward, backward, clipping, AdamW step, zeroed gradients. ``columns`` is qa-dist's
    ``FeatureColumns``, so both loops train on the same windows; ``pad_to=None`` pads each batch to
    its longest window, ``pad_to=max_length`` pads every window as the tutorials do."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    torch.manual_seed(seed)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    model.train()
    # The kernel qa-dist uses (train.fused_adamw, on by default): the comparison is of the loops.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    seconds = []
    for indices in plan:
        started = time.perf_counter()
        batch = columns.batch(indices, pad_id, pad_to=pad_to)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - started)
    return seconds
