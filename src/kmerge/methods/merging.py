"""Methods that feed every prompt token's embedding, merged in blocks of K (K = ratio)."""

from __future__ import annotations

from kmerge.errors import KMergeConfigError
from kmerge.methods.base import Method, register_method


def _block_size(method: Method) -> int:
    ratio = method.ratio
    if float(ratio) != int(ratio):
        raise KMergeConfigError(
            f"method {method.name!r} merges blocks of K = ratio tokens, so its ratio must be a "
            f"whole number; got {ratio}"
        )
    return int(ratio)


@register_method("kmerge")
class KTokenMerging(Method):
    """K-Token Merging itself: learned merge encoder + LoRA, K = ratio."""

    def model_options(self) -> dict:
        return {"k": _block_size(self)}


@register_method("kmerge_segments")
class KTokenMergingSegments(Method):
    """K-Token Merging with segment-aligned blocks (never across a newline or comma), the
    steadiest layout at equal training time here (docs/quality.md)."""

    exact_ratio = False  # a block ends early at a segment's end: more positions than n / K

    def model_options(self) -> dict:
        return {"k": _block_size(self), "block_alignment": "segments"}


@register_method("kmerge_protect_query")
class KTokenMergingProtectQuery(KTokenMergingSegments):
    """Segment-aligned K-Token Merging of the context only: the task's question (its
    ``query_pattern``) stays ordinary tokens, as ICAE, xRAG and gist tokens do. Its measured
    compression counts the raw question."""

    protects_query = True


@register_method("mean_pool")
class MeanPool(Method):
    """The mean of each K-block, no learned encoder (the encoder frozen at its initial state,
    which is exactly the mean); LoRA-tuned like kmerge. Isolates what the encoder's MLP adds."""

    def model_options(self) -> dict:
        return {"k": _block_size(self), "freeze_encoder": True}


@register_method("full")
class Full(Method):
    """No compression (K = 1), LoRA-tuned: the reference point at ratio 1."""

    takes_ratio = False

    def model_options(self) -> dict:
        return {"k": 1}
