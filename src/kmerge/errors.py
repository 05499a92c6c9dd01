"""Errors kmerge raises for bad input: one line, naming the value and the limit."""


class KMergeError(ValueError):
    """Base class for kmerge's user-facing errors."""


class KMergeConfigError(KMergeError):
    """A bad setting (K, model name, checkpoint mismatch)."""


class KMergeDataError(KMergeError):
    """A malformed data row or a prompt that does not fit."""
