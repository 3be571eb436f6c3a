"""SQuAD v2.0 metric (an ``evaluate`` module shipped with qa-dist; the hub's ``squad_v2`` without the hub).

Load it with ``evaluate.load(qa_dist.evaluate_module("squad_v2"))``. The scoring is qa-dist's
(``qa_dist.score(..., metric="squad_v2")``), numerically identical to the official evaluate-v2.0.py.
"""

import evaluate

from qa_dist.metrics.evaluate_modules import _hf

_CITATION = """\
@inproceedings{Rajpurkar2018SQuAD2,
  title={Know What You Don't Know: Unanswerable Questions for SQuAD},
  author={Pranav Rajpurkar and Robin Jia and Percy Liang},
  booktitle={ACL},
  year={2018}
}
"""

_DESCRIPTION = """
The official scoring of version 2.0 of the Stanford Question Answering Dataset (SQuAD), computed by
qa-dist (qa_dist.metrics) and shipped inside the qa-dist package, so that it loads without the hub.
Its inputs and outputs are those of the hub's `squad_v2` metric.
"""

_KWARGS_DESCRIPTION = """
Computes SQuAD v2.0 scores (exact match and F1, overall, on answerable and on unanswerable questions).
Args:
    predictions: List of question-answers dictionaries with the following key-values:
        - 'id': id of the question-answer pair as given in the references (see below)
        - 'prediction_text': the text of the answer, '' for no answer
        - 'no_answer_probability': the probability (or any score, higher meaning more likely) that the
          question has no answer: the official script's na_probs, e.g. qa-dist's null odds. Given for
          all predictions or none; without it the result has no best_* keys (the official script
          without --na-prob-file).
    references: List of question-answers dictionaries with the following key-values:
        - 'id': id of the question-answer pair (see above),
        - 'answers': {'text': [...], 'answer_start': [...]}; an empty 'text' list marks an
          unanswerable question.
    no_answer_threshold: float, default 1.0
        A question whose no_answer_probability is above it counts as answered with no answer.
Returns:
    'exact': Exact match (the normalized answer exactly match the gold answer)
    'f1': The F-score of predicted tokens versus the gold answer
    'total': Number of score considered
    'HasAns_exact', 'HasAns_f1', 'HasAns_total': the same on answerable questions (if any)
    'NoAns_exact', 'NoAns_f1', 'NoAns_total': the same on unanswerable questions (if any)
    'best_exact': Best exact match (with varying threshold)
    'best_exact_thresh': No-answer probability threshold associated to the best exact match
    'best_f1': Best F1 (with varying threshold)
    'best_f1_thresh': No-answer probability threshold associated to the best F1
    A reference without a prediction counts as wrong (and is logged); the official script crashes.
Examples:

    >>> import qa_dist
    >>> predictions = [{'prediction_text': '1976', 'id': '56e10a3be3433e1400422b22', 'no_answer_probability': 0.}]
    >>> references = [{'answers': {'answer_start': [97], 'text': ['1976']}, 'id': '56e10a3be3433e1400422b22'}]
    >>> squad_v2_metric = evaluate.load(qa_dist.evaluate_module("squad_v2"))
    >>> results = squad_v2_metric.compute(predictions=predictions, references=references)
    >>> print(results)
    {'exact': 100.0, 'f1': 100.0, 'total': 1, 'HasAns_exact': 100.0, 'HasAns_f1': 100.0, 'HasAns_total': 1, 'best_exact': 100.0, 'best_exact_thresh': 0.0, 'best_f1': 100.0, 'best_f1_thresh': 0.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadV2(_hf.OptionalNullOdds, evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_hf.features(),
            codebase_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(self, predictions, references, no_answer_threshold=1.0):
        return _hf.compute(predictions, references, "squad_v2", no_answer_threshold=no_answer_threshold)
