"""What a backend is handed and what it hands back, shared by the local and vLLM backends.

A :class:`GenRequest` is one prompt to continue. The backend works on it (in a worker thread
or an HTTP call) and puts :class:`Delta` events and one final :class:`Done` (or
:class:`Failed`) on its asyncio queue, thread-safely; the route turns them into OpenAI
responses or server-sent events.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kmerge.serving.protocol import APIError, Sampling


@dataclass
class Delta:
    text: str  # new text, safe to show (never part of a stop string)
    token_ids: list[int]


@dataclass
class Done:
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    positions_fed: int
    completion_tokens: int
    k: int


@dataclass
class Failed:
    error: APIError


Event = Delta | Done | Failed


@dataclass
class GenRequest:
    prompt: str
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    k: int | None = None
    index: int = 0  # which choice of the HTTP request this prompt is
    protect: Sequence[tuple[int, int]] | None = None
    # (index, event) pairs; the prompts of one HTTP request share one queue.
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    # Set when the client goes away: the scheduler drops the request at its next step.
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the request's coroutine (callable from any thread)."""
        if isinstance(event, Delta) and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, event))


class TextStream:
    """Detokenises generated ids into text deltas, holding back what might be a stop string.

    The whole text is decoded again at each token (outputs are short), so multi-token
    characters come out whole: a trailing replacement character waits for its next byte."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text safe to emit now, whether a stop string was hit)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        start = max(0, self.emitted - self.hold)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._take(len(self.text)), True
        safe = len(self.text) - self.hold
        if self.text.endswith("\ufffd"):
            safe = min(safe, len(self.text) - 1)
        return self._take(safe), False

    def flush(self) -> str:
        """The held-back rest, at the end of generation."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
