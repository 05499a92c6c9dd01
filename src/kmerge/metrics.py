"""Metrics: exact match, macro-F1, ROC-AUC, perplexity, line-level edit similarity, and P-LF1.

Pure functions over Python values, so that each can be checked against hand-computed numbers.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence


def normalise_answer(text: str) -> str:
    """Exact match ignores surrounding whitespace and case."""
    return text.strip().lower()


def exact_match(prediction: str, reference: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(reference)


def macro_f1(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None
) -> float:
    """Unweighted mean of the per-label F1 scores over ``labels`` (default: the labels seen in
    the references). A label never predicted and never true would be undefined; it is left
    out of ``labels`` by default, and scores 0 when named explicitly (as scikit-learn's
    ``zero_division=0``)."""
    if len(predictions) != len(references) or not references:
        raise ValueError("macro_f1 needs equally many predictions and references (at least 1)")
    labels = list(labels) if labels is not None else sorted(set(references))
    scores = []
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(predictions, references))
        fp = sum(p == label and r != label for p, r in zip(predictions, references))
        fn = sum(p != label and r == label for p, r in zip(predictions, references))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve: the chance that a random positive example scores higher than a
    random negative one (ties count half). Threshold-free, so it tells how well a classifier
    ranks apart from where it puts its decision line."""
    if len(scores) != len(positive):
        raise ValueError("roc_auc needs as many scores as labels")
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        raise ValueError("roc_auc needs at least one positive and one negative example")
    # Mann-Whitney U from ranks (average ranks for ties): O(n log n).
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positive) if p)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp of the mean negative log-likelihood per answer token (natural log)."""
    if total_tokens < 1:
        raise ValueError("perplexity needs at least one token")
    return math.exp(total_nll / total_tokens)


def line_edit_similarity(prediction: str, reference: str) -> float:
    """How alike two texts are line by line, in [0, 1]: difflib's ratio over the lists of
    lines (2 * matching lines / total lines). Two empty texts are identical (1.0)."""
    a, b = prediction.splitlines(), reference.splitlines()
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def length_reduction(prompt_tokens: float, positions_fed: float) -> float:
    """LR = 1 - positions fed / prompt tokens: 0 uncompressed, 0.75 for K = 4."""
    if prompt_tokens <= 0:
        raise ValueError("length_reduction needs prompt_tokens > 0")
    return 1.0 - positions_fed / prompt_tokens


def p_lf1(performance: float, reduction: float) -> float:
    """Our reading of the paper's P-LF1 (its formula is not published): the harmonic mean of
    normalised performance P and length reduction LR, both in [0, 1]. 0 when both are 0."""
    for name, value in (("performance", performance), ("length reduction", reduction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"P-LF1 needs {name} in [0, 1], got {value}")
    if performance + reduction == 0:
        return 0.0
    return 2 * performance * reduction / (performance + reduction)


def perplexity_performance(method_ppl: float, reference_ppl: float) -> float:
    """P for perplexity: ppl_uncompressed / ppl_method, capped at 1."""
    return min(1.0, reference_ppl / method_ppl)
