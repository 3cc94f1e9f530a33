"""One engine thread doing continuous batching over a `Backend`'s prefill/decode steps.

The HTTP side never touches the model: a route prepares a request (audio decode, render,
tokenize: all per-request work, done in a worker thread) and `Engine.submit`s it. The one
engine thread then loops:

    drop cancelled rows -> admit waiting requests (prefill) -> one decode step for all rows

so requests join and leave the running batch between decode steps and no request waits
for another to finish. Events (text deltas, the finish) go back to the request's asyncio
queue with `call_soon_threadsafe`. A `Backend` owns the model state and the per-row
decode state (lalm.generate's pieces for the real model, `fake.FakeBackend` in tests);
the engine owns scheduling, stop strings, token limits and UTF-8-safe text.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("lalm.serve")


@dataclass(frozen=True)
class Options:
    """Per-request decoding options (OpenAI names mapped to lalm's)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Prepared:
    """A request ready for the model: the backend's own prompt object plus its length."""

    prompt: Any
    prompt_tokens: int


@dataclass
class Sampled:
    """One sampled token of one row, with its log-prob and the top alternatives."""

    token: int
    logprob: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)


class Backend(Protocol):
    """What the engine needs from a model. Row keys are the engine's request ids."""

    model_name: str
    max_context: int  # prompt + completion tokens a row may hold
    eos_ids: frozenset[int]

    def prepare(self, conversation: list[dict], add_generation_prompt: bool = True) -> Prepared:
        """Render + tokenize + audio features. Thread-safe; raises LalmError on bad input."""

    def add(self, rows: list[tuple[int, Prepared, Options]]) -> dict[int, Sampled]:
        """Prefill new rows into the running batch; returns each new row's first token."""

    def step(self) -> dict[int, Sampled]:
        """One decode step for every row in the batch; returns each row's next token."""

    def remove(self, keys: list[int]) -> None:
        """Drop rows (finished or cancelled) so they stop costing compute."""

    def decode(self, ids: list[int]) -> str: ...

    def token_text(self, token: int) -> str: ...


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Delta:
    text: str
    logprobs: list[dict] = field(default_factory=list)


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str
    status: int = 500


class _Request:
    def __init__(self, key: int, prepared: Prepared, options: Options, loop, engine: "Engine"):
        self.key = key
        self.prepared = prepared
        self.options = options
        self.loop = loop
        self.engine = engine
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.done = False  # engine side: the final event was posted
        self.ended = False  # async side: the final event was read
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already sent
        self.pending_logprobs: list[dict] = []

    # -- the async side: what a route iterates --
    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.ended:
            raise StopAsyncIteration
        ev = await self.events.get()
        self.ended = isinstance(ev, (Finished, Failed))
        return ev

    def cancel(self) -> None:
        """Free the slot (client disconnected); safe to call twice or after the end."""
        if not self.done:
            self.cancelled = True
            self.engine._wake()


class Engine:
    def __init__(self, backend: Backend, max_batch: int = 32, max_queue: int = 256):
        self.backend = backend
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._cv = threading.Condition()
        self._waiting: list[_Request] = []
        self._running: dict[int, _Request] = {}
        self._keys = itertools.count()
        self._stopping = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (tests read it to see batching happen)
        self.max_rows_seen = 0

    # ---- lifecycle ----
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lalm-engine", daemon=True)
            self._thread.start()

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Refuse new work, fail what waits, let running rows finish for `grace_s`, then abort."""
        with self._cv:
            self._stopping = True
            self._deadline = time.monotonic() + grace_s
            waiting, self._waiting = self._waiting, []
            self._cv.notify_all()
        for r in waiting:
            self._finish(r, Failed("the server is shutting down", 503))
        if self._thread is not None:
            self._thread.join(grace_s + 5.0)
            self._thread = None

    @property
    def load(self) -> tuple[int, int]:
        with self._cv:
            return len(self._running), len(self._waiting)

    # ---- submit ----
    def submit(self, prepared: Prepared, options: Options) -> _Request:
        """Queue a request; iterate the returned object for Delta ... Finished | Failed."""
        loop = asyncio.get_running_loop()
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            # Admitted rows wait at most one step; the queue bounds everyone else.
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - len(self._running)):
                raise QueueFull(
                    f"the server is busy: {len(self._running)} requests running and "
                    f"{len(self._waiting)} queued (limit {self.max_queue}); retry later"
                )
            r = _Request(next(self._keys), prepared, options, loop, self)
            self._waiting.append(r)
            self._cv.notify_all()
        return r

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ---- the engine thread ----
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._running or self._stopping):
                    self._cv.wait()
                if self._stopping and not self._running:
                    return
                dropped = [r for r in self._running.values() if r.cancelled]
                for r in self._waiting:
                    if r.cancelled:
                        dropped.append(r)
                self._waiting = [r for r in self._waiting if not r.cancelled]
                if self._stopping and self._deadline is not None:
                    if time.monotonic() > self._deadline:
                        dropped += [r for r in self._running.values() if not r.cancelled]
                free = self.max_batch - (len(self._running) - sum(
                    1 for r in dropped if r.key in self._running))
                admitted = self._waiting[:max(0, free)]
                self._waiting = self._waiting[len(admitted):]
            try:
                self._tick(dropped, admitted)
            except Exception as e:  # a bug in a backend: fail the batch, keep serving
                log.exception("engine step failed")
                rows = list(self._running.values()) + admitted
                self._running.clear()
                try:
                    self.backend.remove([r.key for r in rows])
                except Exception:
                    log.exception("backend.remove failed after an engine error")
                for r in rows:
                    self._finish(r, Failed(f"internal error in the engine: {type(e).__name__}"))

    def _tick(self, dropped: list[_Request], admitted: list[_Request]) -> None:
        gone = [r.key for r in dropped if r.key in self._running]
        for r in dropped:
            self._running.pop(r.key, None)
        if gone:
            self.backend.remove(gone)
        for r in dropped:
            reason = "abort"
            self._finish(r, Finished(reason, r.prepared.prompt_tokens, len(r.ids)))
        if admitted:
            for r in admitted:
                self._running[r.key] = r
            firsts = self.backend.add([(r.key, r.prepared, r.options) for r in admitted])
            self._consume(firsts)
        elif self._running:
            self._consume(self.backend.step())
            self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(self._running))

    def _consume(self, sampled: dict[int, Sampled]) -> None:
        finished = []
        for key, s in sampled.items():
            r = self._running.get(key)
            if r is None or r.cancelled:
                continue
            reason = self._accept(r, s)
            if reason is not None:
                finished.append((r, reason))
        if finished:
            self.backend.remove([r.key for r, _ in finished])
            for r, reason in finished:
                self._running.pop(r.key, None)
                self._finish(r, Finished(reason, r.prepared.prompt_tokens, len(r.ids)))

    def _accept(self, r: _Request, s: Sampled) -> str | None:
        """Append one token to a row; send the text it completes. Returns a finish reason."""
        eos = s.token in self.backend.eos_ids
        if not eos:
            r.ids.append(s.token)
            if r.options.logprobs:
                r.pending_logprobs.append(self._logprob_entry(s, r.options.top_logprobs))
        text = self.backend.decode(r.ids)
        reason = None
        cut = len(text)
        for stop in r.options.stop:
            at = text.find(stop, max(0, r.sent - len(stop) + 1))
            if at != -1 and at < cut:
                cut, reason = at, "stop"
        if reason is None:
            if eos:
                reason = "stop"
            elif len(r.ids) >= r.options.max_new_tokens:
                reason = "length"
            elif r.prepared.prompt_tokens + len(r.ids) >= self.backend.max_context:
                reason = "length"
        if reason is None:
            # Hold back an incomplete UTF-8 character (decoded as U+FFFD until its last byte
            # arrives) and any tail that may be the start of a stop string.
            cut = len(text.rstrip("\ufffd"))
            hold = 0
            for stop in r.options.stop:
                for k in range(min(len(stop) - 1, cut), 0, -1):
                    if text[cut - k:cut] == stop[:k]:
                        hold = max(hold, k)
                        break
            cut -= hold
        if cut > r.sent or (reason is not None and r.pending_logprobs):
            delta = Delta(text[r.sent:cut], r.pending_logprobs)
            r.pending_logprobs = []
            r.sent = max(r.sent, cut)
            self._post(r, delta)
        return reason

    def _logprob_entry(self, s: Sampled, top_n: int) -> dict:
        def entry(token: int, lp: float) -> dict:
            t = self.backend.token_text(token)
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

        e = entry(s.token, s.logprob)
        e["top_logprobs"] = [entry(t, lp) for t, lp in s.top[:top_n]]
        return e

    def _post(self, r: _Request, ev: Any) -> None:
        try:
            r.loop.call_soon_threadsafe(r.events.put_nowait, ev)
        except RuntimeError:  # the request's event loop is gone (server stopped)
            r.cancelled = True

    def _finish(self, r: _Request, ev: Any) -> None:
        if r.done:
            return
        r.done = True
        self._post(r, ev)
