"""Assertions shared by tests that compare two computation paths of one model.

Greedy decoding is an argmax: two paths that agree up to float rounding (batched vs one by one,
KV-cached vs re-run, LoRA merged vs beside the base weights, saved vs reloaded) can still pick
different tokens where two logits are nearly tied, and which way such a tie breaks depends on
the CPU (instruction set, BLAS kernels) and the thread count. So greedy token lists are not
compared for exact equality: they may differ, but only at a step where the model itself, scored
on the common prefix with teacher forcing, shows a near-tie between the two tokens chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Largest gap (in logits, relative to max(1, |top logit|)) that still counts as a near-tie.
#: Rounding differences between paths are ~1e-6 relative in float32; a genuine preference
#: between two tokens is far larger than 1e-3.
GREEDY_TIE_TOLERANCE = 1e-3


@torch.no_grad()
def next_token_logits(model, prompt: str, prefix: Sequence[int]) -> torch.Tensor:
    """Teacher-forced logits for the token after ``prompt`` (merged, prepared alone, so without
    padding) followed by the generated tokens ``prefix``: one forward pass, no KV cache."""
    was_training = model.training
    model.eval()
    try:
        batch = model.prepare([prompt], reserve=len(prefix) + 1)
        embeds, mask, positions = batch.inputs_embeds, batch.attention_mask, batch.position_ids
        if prefix:
            ids = torch.tensor([list(prefix)], dtype=torch.long, device=embeds.device)
            steps = torch.arange(1, len(prefix) + 1, device=positions.device)[None]
            embeds = torch.cat([embeds, model.lm.get_input_embeddings()(ids)], dim=1)
            mask = torch.cat([mask, mask.new_ones(1, len(prefix))], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + steps], dim=1)
        logits = model.lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits
    finally:
        model.train(was_training)
    return logits[0, -1].float()


def greedy_divergence(
    model,
    prompt: str,
    tokens_a: Sequence[int],
    tokens_b: Sequence[int],
    tol: float = GREEDY_TIE_TOLERANCE,
    exclude: Sequence[int] = (),
) -> str | None:
    """None if the two greedy continuations of ``prompt`` agree or first diverge at a near-tie;
    otherwise a message saying where and by how much they disagree.

    A row that ends before the other is taken to have chosen EOS there (``generate_ids`` cuts
    rows at EOS). ``exclude`` lists token ids the decoding could not choose (e.g. EOS under
    ``min_new_tokens``)."""
    tokens_a, tokens_b = list(tokens_a), list(tokens_b)
    if tokens_a == tokens_b:
        return None
    step = next(
        (i for i, (a, b) in enumerate(zip(tokens_a, tokens_b)) if a != b),
        min(len(tokens_a), len(tokens_b)),
    )
    eos = model.tokenizer.eos_token_id
    a = tokens_a[step] if step < len(tokens_a) else eos
    b = tokens_b[step] if step < len(tokens_b) else eos
    logits = next_token_logits(model, prompt, tokens_a[:step])
    if exclude:
        logits[list(exclude)] = -torch.inf
    top = logits.max().item()
    gap = top - min(logits[a].item(), logits[b].item())
    allowed = tol * max(1.0, abs(top))
    if gap <= allowed:
        return None
    return (
        f"greedy outputs diverge at step {step} ({a} vs {b}) without a near-tie: logits "
        f"{logits[a].item():.6f} vs {logits[b].item():.6f}, top {top:.6f}, gap {gap:.3g} > "
        f"{allowed:.3g}; prompt {prompt!r}, a={tokens_a}, b={tokens_b}"
    )


def assert_greedy_equivalent(
    model,
    prompts: str | Sequence[str],
    tokens_a: Sequence[Sequence[int]] | Sequence[int],
    tokens_b: Sequence[Sequence[int]] | Sequence[int],
    tol: float = GREEDY_TIE_TOLERANCE,
    exclude: Sequence[int] = (),
) -> None:
    """Two greedy decodings (token id rows, one per prompt) of ``prompts`` are the same up to
    near-ties: at the first step where a row differs, ``model``'s teacher-forced logits on the
    common prefix put both chosen tokens within ``tol`` of the top logit. A single prompt string
    takes single rows."""
    if isinstance(prompts, str):
        prompts, tokens_a, tokens_b = [prompts], [tokens_a], [tokens_b]
    assert len(tokens_a) == len(tokens_b) == len(prompts), (len(tokens_a), len(tokens_b))
    failures = [
        message
        for prompt, row_a, row_b in zip(prompts, tokens_a, tokens_b)
        if (message := greedy_divergence(model, prompt, row_a, row_b, tol, exclude)) is not None
    ]
    assert not failures, "\n".join(failures)
