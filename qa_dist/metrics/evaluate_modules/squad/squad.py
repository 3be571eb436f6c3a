"""SQuAD v1.1 metric (an ``evaluate`` module shipped with qa-dist; the hub's ``squad`` without the hub).

Load it with ``evaluate.load(qa_dist.evaluate_module("squad"))``. The scoring is qa-dist's
(``qa_dist.score(..., metric="squad")``), numerically identical to the official evaluate-v1.1.py.
"""

import evaluate

from qa_dist.metrics.evaluate_modules import _hf

_CITATION = """\
@inproceedings{Rajpurkar2016SQuAD10,
  title={SQuAD: 100, 000+ Questions for Machine Comprehension of Text},
  author={Pranav Rajpurkar and Jian Zhang and Konstantin Lopyrev and Percy Liang},
  booktitle={EMNLP},
  year={2016}
}
"""

_DESCRIPTION = """
The official scoring of version 1.1 of the Stanford Question Answering Dataset (SQuAD), computed by
qa-dist (qa_dist.metrics) and shipped inside the qa-dist package, so that it loads without the hub.
Its inputs and outputs are those of the hub's `squad` metric.
"""

_KWARGS_DESCRIPTION = """
Computes SQuAD v1.1 scores (exact match and F1).
Args:
    predictions: List of question-answers dictionaries with the following key-values:
        - 'id': id of the question-answer pair as given in the references (see below)
        - 'prediction_text': the text of the answer
        - 'no_answer_probability' (optional): accepted for the squad_v2 format, not used by v1.1
    references: List of question-answers dictionaries with the following key-values:
        - 'id': id of the question-answer pair (see above),
        - 'answers': a Dict in the SQuAD dataset format
            {
                'text': list of possible texts for the answer, as a list of strings
                'answer_start': list of start positions for the answer, as a list of ints
            }
            Note that answer_start values are not taken into account to compute the metric.
Returns:
    'exact_match': Exact match (the normalized answer exactly match the gold answer), in percent
    'f1': The F-score of predicted tokens versus the gold answer, in percent
    A reference without a prediction counts as wrong (and is logged), as in the official script.
Examples:

    >>> import qa_dist
    >>> predictions = [{'prediction_text': '1976', 'id': '56e10a3be3433e1400422b22'}]
    >>> references = [{'answers': {'answer_start': [97], 'text': ['1976']}, 'id': '56e10a3be3433e1400422b22'}]
    >>> squad_metric = evaluate.load(qa_dist.evaluate_module("squad"))
    >>> results = squad_metric.compute(predictions=predictions, references=references)
    >>> print(results)
    {'exact_match': 100.0, 'f1': 100.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Squad(_hf.OptionalNullOdds, evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_hf.features(),
            codebase_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(self, predictions, references):
        return _hf.compute(predictions, references, "squad")
