"""The local backend's batching scheduler: static batches per gathered group, with early exit.

One worker thread owns the model. It takes the first waiting request, gathers whatever else
arrives within ``batch_wait_ms`` (up to ``max_batch_size``), merges all their prompts as one
batch (``KMergeModel.prepare``) and decodes them together with the KV cache. A row leaves the
batch as soon as it is done (EOS, a stop string, its max_tokens, or its client gone), so later
steps only compute the rows still running. Requests that arrive meanwhile wait for the next
group: new rows do not join a running batch (that would be iteration-level batching).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict

from kmerge.errors import KMergeError
from kmerge.serving.decode import DecodeBatch
from kmerge.serving.engine import Delta, Done, Failed, GenRequest, TextStream
from kmerge.serving.metrics import ServeMetrics
from kmerge.serving.protocol import APIError

_STOP = object()  # tells the worker to exit once everything before it is done


class Scheduler:
    def __init__(
        self,
        model,
        metrics: ServeMetrics,
        max_batch_size: int = 16,
        batch_wait_ms: float = 5.0,
        max_queue: int = 64,
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.max_queue = max_queue
        self.inbox: queue.Queue = queue.Queue()
        self.outstanding = 0  # waiting + running; bounded by max_queue
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._work, name="kmerge-scheduler", daemon=True)

    # ------------------------------------------------------------ called from the event loop
    def start(self) -> None:
        self.thread.start()

    def submit(self, request: GenRequest) -> None:
        """Queue ``request``; 429 when ``max_queue`` requests are already waiting or running."""
        with self.lock:
            if self.outstanding >= self.max_queue:
                raise APIError(
                    429,
                    f"server busy: {self.outstanding} requests waiting or running "
                    f"(limit {self.max_queue}); retry later",
                    type="rate_limit_error",
                )
            self.outstanding += 1
        self.metrics.queued.inc()
        self.inbox.put(request)

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was queued, then end the worker."""
        if self.thread.is_alive():
            self.inbox.put(_STOP)
            self.thread.join(timeout)

    # ------------------------------------------------------------ the worker thread
    def _work(self) -> None:
        while True:
            first = self.inbox.get()
            if first is _STOP:
                return
            group, stop = self._gather(first)
            try:
                self._run_group(group)
            finally:
                with self.lock:
                    self.outstanding -= len(group)
            if stop:
                return

    def _gather(self, first: GenRequest) -> tuple[list[GenRequest], bool]:
        group = [first]
        deadline = time.perf_counter() + self.batch_wait
        while len(group) < self.max_batch_size:
            try:
                item = self.inbox.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if item is _STOP:
                return group, True
            group.append(item)
        return group, False

    def _run_group(self, group: list[GenRequest]) -> None:
        self.metrics.queued.dec(len(group))
        by_k: dict[int, list[GenRequest]] = defaultdict(list)
        for r in group:
            if r.cancelled.is_set():
                self.metrics.cancelled.inc()
                continue
            try:
                by_k[self.model.resolve_k(r.k)].append(r)
            except KMergeError as err:
                r.emit(Failed(APIError(400, str(err), param="k")))
        for k, requests in by_k.items():  # one batch per K: prepare merges at one K
            try:
                self._decode(k, requests)
            except Exception as err:  # a bug must not kill the worker: fail the batch
                for r in requests:
                    r.emit(Failed(APIError(500, f"generation failed: {err}", "server_error")))

    def _prepare(self, k: int, requests: list[GenRequest]):
        """Merge the prompts as one batch; a request that cannot be merged or does not fit
        fails alone (400) and the rest are merged again without it."""
        max_positions = self.model.max_positions
        while requests:
            try:
                batch = self.model.prepare(
                    [r.prompt for r in requests],
                    k=k,
                    protect=[list(r.protect or []) for r in requests]
                    if any(r.protect for r in requests)
                    else None,
                )
            except KMergeError as err:
                bad = getattr(err, "index", None)
                victims = [requests[bad]] if bad is not None else list(requests)
                for r in victims:
                    r.emit(
                        Failed(
                            APIError(
                                400,
                                str(err),
                                code="context_length_exceeded" if bad is not None else None,
                            )
                        )
                    )
                requests = [r for r in requests if r not in victims]
                continue
            too_long = [
                i
                for i, (r, n) in enumerate(zip(requests, batch.positions_fed))
                if max_positions is not None and n + r.sampling.max_tokens > max_positions
            ]
            if not too_long:
                return requests, batch
            for i in too_long:
                r, n = requests[i], batch.positions_fed[i]
                message = (
                    f"the prompt needs {n} positions at K={k} ({batch.prompt_tokens[i]} tokens) "
                    f"+ max_tokens={r.sampling.max_tokens}, over the model's context of "
                    f"{max_positions}"
                )
                r.emit(Failed(APIError(400, message, code="context_length_exceeded")))
            requests = [r for i, r in enumerate(requests) if i not in too_long]
        return [], None

    def _decode(self, k: int, requests: list[GenRequest]) -> None:
        requests, batch = self._prepare(k, requests)
        if not requests:
            return
        self.metrics.batch_size.observe(len(requests))
        self.metrics.running.set(len(requests))
        eos = self.model.tokenizer.eos_token_id
        streams = [TextStream(self.model.tokenizer, r.sampling.stop) for r in requests]
        for n, p in zip(batch.prompt_tokens, batch.positions_fed):
            self.metrics.record_prompt(n, p)
        decoder = DecodeBatch(self.model, batch, [r.sampling for r in requests])
        live = list(range(len(requests)))
        while True:
            tokens = decoder.tokens()
            still = []
            for row in live:
                r, stream, token = requests[row], streams[row], tokens[row]
                if r.cancelled.is_set():
                    self.metrics.cancelled.inc()
                    continue  # the client is gone: its row leaves the batch
                reason = None
                if token == eos and not r.sampling.ignore_eos:
                    reason = "stop"
                else:
                    text, stopped = stream.push(token)
                    if text or not stopped:
                        r.emit(Delta(text, [token]))
                    if stopped:
                        reason = "stop"
                    elif len(stream.ids) >= r.sampling.max_tokens:
                        reason = "length"
                if reason is None:
                    still.append(row)
                    continue
                rest = stream.flush()
                if rest:
                    r.emit(Delta(rest, []))
                r.emit(
                    Done(
                        reason,
                        batch.prompt_tokens[row],
                        batch.positions_fed[row],
                        len(stream.ids),
                        k,
                    )
                )
                self.metrics.record_finish(
                    r.created, r.first_token_at, time.perf_counter(), len(stream.ids)
                )
            live = still
            self.metrics.running.set(len(live))
            if not live:
                return
            decoder.keep(live)
            decoder.step()
