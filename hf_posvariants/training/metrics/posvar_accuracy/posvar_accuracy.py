"""posvar_accuracy: accuracy and macro-F1 over labelled positions, and perplexity from per-token losses.

One module for the two uses of the training script: masked-token (or next-token) accuracy of a
language model, where unlabelled positions carry the label -100 and are skipped, and accuracy/F1
of a sequence classifier. Pass `token_nll` (the negative log-likelihood of each reference, in
nats, aligned with `references`) to get perplexity = exp(mean NLL over labelled positions).
"""

import math

import datasets
import evaluate
import numpy as np

IGNORE_INDEX = -100

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class or token ids.
    references (`list[int]`): true ids; -100 marks a position that is not scored.
    token_nll (`list[float]`, *optional*): negative log-likelihood of each reference; adds `perplexity`.
Returns:
    accuracy (`float`), f1 (`float`, macro-averaged over the classes present), perplexity (`float`, optional).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PosvarAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, token_nll=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        scored = references != IGNORE_INDEX
        predictions, references = predictions[scored], references[scored]
        if references.size == 0:
            raise ValueError("no scored positions: every reference is -100.")
        result = {"accuracy": float((predictions == references).mean()), "f1": _macro_f1(predictions, references)}
        if token_nll is not None:
            token_nll = np.asarray(token_nll, dtype=np.float64)[scored]
            result["perplexity"] = float(math.exp(token_nll.mean()))
        return result


def _macro_f1(predictions: np.ndarray, references: np.ndarray) -> float:
    """Mean over the classes seen in either array of 2·TP / (2·TP + FP + FN)."""
    scores = []
    for label in np.union1d(predictions, references):
        true_positive = np.sum((predictions == label) & (references == label))
        false_either_way = np.sum((predictions == label) ^ (references == label))  # FP + FN
        scores.append(2 * true_positive / (2 * true_positive + false_either_way))
    return float(np.mean(scores))
