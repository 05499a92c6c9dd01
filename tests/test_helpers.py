"""The shared greedy-equivalence assertion (tests/helpers.py) accepts a difference only at a
near-tie of the model's own teacher-forced logits."""

import pytest

from tests.conftest import randomise_trainables
from tests.helpers import assert_greedy_equivalent, next_token_logits

PROMPTS = ["What is the capital of France?", "one two three four"]


@pytest.fixture
def model_and_tokens(tiny_model):
    model = tiny_model(4)
    randomise_trainables(model, seed=5)
    return model, model.generate_ids(PROMPTS, max_new_tokens=4)


def test_teacher_forcing_reproduces_greedy_tokens(model_and_tokens):
    """Scoring prompt + prefix reproduces each generated token as the argmax (up to a tie)."""
    model, tokens = model_and_tokens
    for prompt, row in zip(PROMPTS, tokens):
        assert len(row) == 4
        for step, token in enumerate(row):
            logits = next_token_logits(model, prompt, row[:step])
            assert logits.max() - logits[token] <= 1e-5 * logits.abs().max()


def test_identical_rows_pass_and_a_worse_token_fails(model_and_tokens):
    model, tokens = model_and_tokens
    assert_greedy_equivalent(model, PROMPTS, tokens, [list(row) for row in tokens])
    worst = int(next_token_logits(model, PROMPTS[0], tokens[0][:1]).argmin())
    changed = [tokens[0][:1] + [worst], tokens[1]]
    with pytest.raises(AssertionError, match="diverge at step 1"):
        assert_greedy_equivalent(model, PROMPTS, tokens, changed)
    # A row cut short reads as EOS at that step, which is no near-tie either.
    with pytest.raises(AssertionError, match="diverge at step 0"):
        assert_greedy_equivalent(model, PROMPTS[1], tokens[1], [])


def test_tolerance_is_the_gap_to_the_top_logit(model_and_tokens):
    """The runner-up token passes exactly when the tolerance covers its gap to the top."""
    model, tokens = model_and_tokens
    logits = next_token_logits(model, PROMPTS[0], [])
    top, runner_up = logits.topk(2).indices.tolist()
    assert top == tokens[0][0]
    gap = (logits[top] - logits[runner_up]).item() / max(1.0, logits[top].abs().item())
    other = [runner_up]
    assert_greedy_equivalent(model, PROMPTS[0], tokens[0], other, tol=gap * 1.01)
    with pytest.raises(AssertionError, match="without a near-tie"):
        assert_greedy_equivalent(model, PROMPTS[0], tokens[0], other, tol=gap * 0.99)
    # A token the decoding could not choose (EOS under min_new_tokens) does not count: with the
    # top token excluded, the runner-up is the top, and the third is tied with it or not
    # depending on that gap alone.
    third = logits.topk(3).indices[2].item()
    gap23 = (logits[runner_up] - logits[third]).item() / max(1.0, logits[runner_up].abs().item())
    pair = ([runner_up], [third])
    assert_greedy_equivalent(model, PROMPTS[0], *pair, tol=gap23 * 1.01, exclude=[top])
    with pytest.raises(AssertionError, match="without a near-tie"):
        assert_greedy_equivalent(model, PROMPTS[0], *pair, tol=gap23 * 0.99, exclude=[top])
    with pytest.raises(AssertionError, match="without a near-tie"):
        assert_greedy_equivalent(model, PROMPTS[0], *pair, tol=gap23 * 1.01)
