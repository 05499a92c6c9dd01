"""Each metric against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from kmerge.metrics import (
    exact_match,
    length_reduction,
    line_edit_similarity,
    macro_f1,
    p_lf1,
    perplexity,
    perplexity_performance,
    roc_auc,
)


def test_exact_match_ignores_case_and_surrounding_space():
    assert exact_match(" True\n", "true")
    assert not exact_match("true.", "true")


def test_macro_f1_by_hand():
    # positive: tp=2 fp=1 fn=1 -> F1 = 4/6; negative: tp=1 fp=1 fn=1 -> F1 = 2/4.
    predictions = ["pos", "pos", "neg", "pos", "neg"]
    references = ["pos", "pos", "pos", "neg", "neg"]
    assert macro_f1(predictions, references) == pytest.approx((4 / 6 + 2 / 4) / 2)


def test_macro_f1_punishes_the_majority_guess():
    """85% positive: always answering "positive" has 85% accuracy but macro-F1 0.46."""
    references = ["positive"] * 85 + ["negative"] * 15
    always = ["positive"] * 100
    f1_positive = 2 * 85 / (2 * 85 + 15)
    assert macro_f1(always, references, labels=["negative", "positive"]) == pytest.approx(
        f1_positive / 2
    )
    assert macro_f1(references, references) == 1.0


def test_macro_f1_errors():
    with pytest.raises(ValueError):
        macro_f1(["a"], ["a", "b"])


def test_perplexity():
    assert perplexity(2 * math.log(3), 2) == pytest.approx(3.0)
    assert perplexity(0.0, 5) == 1.0
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_line_edit_similarity_by_hand():
    ref = "a\nb\nc\nd"
    assert line_edit_similarity(ref, ref) == 1.0
    # One of four lines changed: 3 matching lines, 2 * 3 / (4 + 4).
    assert line_edit_similarity("a\nb\nX\nd", ref) == pytest.approx(0.75)
    # Half the lines: 2 * 2 / (2 + 4).
    assert line_edit_similarity("a\nb", ref) == pytest.approx(4 / 6)
    assert line_edit_similarity("", "") == 1.0
    assert line_edit_similarity("", ref) == 0.0


def test_length_reduction_and_p_lf1_by_hand():
    assert length_reduction(100, 25) == pytest.approx(0.75)
    assert length_reduction(100, 100) == 0.0
    # P = 0.8, LR = 0.75: 2 * 0.6 / 1.55.
    assert p_lf1(0.8, 0.75) == pytest.approx(1.2 / 1.55)
    assert p_lf1(0.9, 0.0) == 0.0  # uncompressed: no length reduction, P-LF1 0
    assert p_lf1(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        p_lf1(1.2, 0.5)


def test_perplexity_performance_is_capped():
    assert perplexity_performance(4.0, 2.0) == 0.5  # twice the reference perplexity
    assert perplexity_performance(1.5, 2.0) == 1.0  # better than the reference: capped


def test_roc_auc_by_hand():
    # Positives score 0.9, 0.4; negatives 0.5, 0.1: of the 4 pairs, 3 rank right -> 0.75.
    assert roc_auc([0.9, 0.5, 0.4, 0.1], [True, False, True, False]) == pytest.approx(0.75)
    assert roc_auc([3, 2, 1], [True, True, False]) == 1.0
    assert roc_auc([1, 2, 3], [True, True, False]) == 0.0
    # A tie between a positive and a negative counts half: 1 right + 0.5 of 2 pairs.
    assert roc_auc([2, 2, 1], [True, False, False]) == pytest.approx(0.75)


def test_roc_auc_is_rank_based():
    """Any increasing transform of the scores leaves it unchanged (threshold-free)."""
    scores, labels = [0.3, -1.2, 2.0, 0.7, 0.3, -0.1], [True, False, True, False, False, True]
    assert roc_auc(scores, labels) == pytest.approx(roc_auc([math.exp(s) for s in scores], labels))


def test_roc_auc_errors():
    with pytest.raises(ValueError, match="as many"):
        roc_auc([1.0], [True, False])
    with pytest.raises(ValueError, match="one positive and one negative"):
        roc_auc([1.0, 2.0], [True, True])
