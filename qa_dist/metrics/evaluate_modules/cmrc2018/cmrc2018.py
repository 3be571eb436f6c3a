"""CMRC2018 metric (an ``evaluate`` module shipped with qa-dist), also the metric for DRCD.

Load it with ``evaluate.load(qa_dist.evaluate_module("cmrc2018"))``. The scoring is qa-dist's
(``qa_dist.score(..., metric="cmrc")``), numerically identical to the official cmrc2018_evaluate.py.
"""

import evaluate

from qa_dist.metrics.evaluate_modules import _hf

_CITATION = """\
@inproceedings{cui-etal-2019-span,
  title={A Span-Extraction Dataset for {C}hinese Machine Reading Comprehension},
  author={Cui, Yiming and Liu, Ting and Che, Wanxiang and Xiao, Li and Chen, Zhipeng and Ma, Wentao and Wang, Shijin and Hu, Guoping},
  booktitle={EMNLP-IJCNLP},
  year={2019}
}
"""

_DESCRIPTION = """
The official scoring of the CMRC2018 Chinese machine reading comprehension evaluation (also used for
DRCD): F1 over the longest common substring of mixed segmentations (one token per CJK character,
other runs word-tokenized) and exact match after removing punctuation. Computed by qa-dist
(qa_dist.metrics) and shipped inside the qa-dist package, so that it loads without the hub.
"""

_KWARGS_DESCRIPTION = """
Computes CMRC2018 scores (F1, EM and their average).
Args:
    predictions: List of question-answers dictionaries with the following key-values:
        - 'id': id of the question-answer pair as given in the references (see below)
        - 'prediction_text': the text of the answer
        - 'no_answer_probability' (optional): passed to qa_dist.score as na_probs
    references: List of question-answers dictionaries with the following key-values:
        - 'id': id of the question-answer pair (see above),
        - 'answers': {'text': [...], 'answer_start': [...]} (answer_start is not used)
Returns:
    The keys of the official cmrc2018_evaluate.py, as numbers:
    'AVERAGE': (EM + F1) / 2
    'F1': F1 in percent
    'EM': exact match in percent
    'TOTAL': number of references
    'SKIP': number of references without a prediction (they count as wrong)
Examples:

    >>> import qa_dist
    >>> predictions = [{'prediction_text': '北京大学', 'id': 'q1'}]
    >>> references = [{'answers': {'answer_start': [0], 'text': ['北京大学出版社']}, 'id': 'q1'}]
    >>> cmrc_metric = evaluate.load(qa_dist.evaluate_module("cmrc2018"))
    >>> results = cmrc_metric.compute(predictions=predictions, references=references)
    >>> print(results)
    {'AVERAGE': 36.36363636363637, 'F1': 72.72727272727273, 'EM': 0.0, 'TOTAL': 1, 'SKIP': 0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Cmrc2018(_hf.OptionalNullOdds, evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_hf.features(),
            codebase_urls=["https://github.com/ymcui/cmrc2018"],
            reference_urls=["https://github.com/ymcui/cmrc2018"],
        )

    def _compute(self, predictions, references):
        return _hf.compute(predictions, references, "cmrc")
