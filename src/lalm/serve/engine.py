"""One engine thread doing continuous batching over a `Backend`'s prefill/decode steps.

The HTTP side never touches the model: a route prepares a request (audio decode, render,
tokenize: all per-request work, done in a worker thread) and `Engine.submit`s it. The one
engine thread then loops:

    drop cancelled rows -> admit waiting requests (prefill) or run one decode step for all

so requests join and leave the running batch between decode steps and no request waits
for another to finish. Events (text deltas, the finish) go back to the request's asyncio
queue with `call_soon_threadsafe`. A `Backend` owns the model and the rows being decoded:
`backend.LALMBackend` runs them on `lalm.generate`'s DecodeState and Row (which own
sampling, stop tokens, stop strings and whole-character text); `fake.FakeBackend` runs
the same Rows on a hash instead of a model. The engine owns only scheduling.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from lalm.errors import LalmError

log = logging.getLogger("lalm.serve")


@dataclass(frozen=True)
class Options:
    """Per-request decoding options (OpenAI's names, mapped by the backend to lalm's)."""

    max_new_tokens: int
    temperature: float | None = None  # None: the checkpoint's default; 0: greedy
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    top_k: int | None = None  # None: the checkpoint's default; 0: off
    repetition_penalty: float | None = None
    min_tokens: int = 0


@dataclass
class Prepared:
    """A request ready for the model: the backend's own prompt object plus its length."""

    prompt: Any
    prompt_tokens: int


@dataclass
class Update:
    """What one row produced in one prefill or decode step."""

    token: int  # the sampled token
    logprob: float  # its log-prob under the model
    text: str  # new text: whole characters, held back while it may start a stop string
    finish: str | None = None  # "stop" | "length" once the row is done
    completion_tokens: int = 0  # tokens generated so far (a final stop token included)
    top: list[tuple[int, float]] = field(default_factory=list)  # best alternatives, if asked


class Backend(Protocol):
    """What the engine needs from a model. Row keys are the engine's request ids."""

    model_name: str
    max_context: int  # prompt + completion tokens a row may hold
    stop_token_ids: frozenset[int]  # tokens that end a row (left out of logprobs)

    def prepare(self, conversation: list[dict]) -> Prepared:
        """Render + tokenize + audio features. Thread-safe; raises LalmError on bad input."""

    def can_add(self, rows: list[tuple[Prepared, Options]]) -> bool:
        """Whether these rows fit next to the running ones now (else they wait)."""

    def add(self, rows: list[tuple[int, Prepared, Options]]) -> dict[int, Update]:
        """Prefill new rows into the running batch; each new row's first token."""

    def step(self) -> dict[int, Update]:
        """One decode step for every running row."""

    def remove(self, keys: list[int]) -> None:
        """Drop rows (finished or cancelled) so they stop costing compute."""

    def token_text(self, token: int) -> str: ...

    def token_bytes(self, token: int) -> bytes: ...


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Delta:
    text: str
    logprobs: list[dict] = field(default_factory=list)  # OpenAI's logprobs.content entries


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "abort" (cancelled: only for a client that left)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str
    status: int = 500


class _Request:
    """A submitted request: the engine thread fills `events`; a route iterates it."""

    def __init__(self, key: int, prepared: Prepared, options: Options, loop, engine: Engine):
        self.key = key
        self.prepared = prepared
        self.options = options
        self.loop = loop
        self.engine = engine
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.done = False  # engine side: the final event was posted
        self.ended = False  # async side: the final event was read
        self.completion_tokens = 0

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
    def __init__(self, backend: Backend, max_batch: int = 32, max_queue: int = 256,
                 max_prefill_tokens: int = 1024):
        self.backend = backend
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self._cv = threading.Condition()
        self._waiting: list[_Request] = []
        self._running: dict[int, _Request] = {}
        # Requests taken off the queue and being prefilled (outside the lock): they hold rows,
        # so `submit` counts them, or a burst could overfill the queue during a prefill.
        self._admitting = 0
        self._keys = itertools.count()
        self._stopping = False
        self._stop_message = "the server is shutting down"
        self._admitted: list[_Request] = []  # the rows `_admitting` counts
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (tests read it to see batching happen)
        self.max_rows_seen = 0
        self._prefilled_last = False

    # ---- lifecycle ----
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lalm-engine", daemon=True)
            self._thread.start()

    def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new work, fail what waits, let running rows finish for `grace_s`, then fail
        them; returns at once. A second call keeps the earlier deadline."""
        with self._cv:
            self._stopping = True
            deadline = time.monotonic() + grace_s
            self._deadline = min(deadline, self._deadline or deadline)
            waiting, self._waiting = self._waiting, []
            self._cv.notify_all()
        for r in waiting:
            self._finish(r, Failed("the server is shutting down", 503))

    def shutdown(self, grace_s: float = 30.0) -> None:
        """`stop`, then wait for the engine thread to end."""
        self.stop(grace_s)
        if self._thread is not None:
            self._thread.join(grace_s + 5.0)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests; rows being prefilled count as running."""
        with self._cv:
            return len(self._running) + self._admitting, len(self._waiting)

    # ---- submit ----
    def submit(self, prepared: Prepared, options: Options) -> _Request:
        """Queue a request; iterate the returned object for Delta ... Finished | Failed."""
        loop = asyncio.get_running_loop()
        with self._cv:
            if self._stopping:
                raise ShuttingDown(self._stop_message)
            free_rows = max(0, self.max_batch - len(self._running) - self._admitting)
            if len(self._waiting) >= self.max_queue + free_rows:
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
        try:
            self._serve()
        except BaseException:
            # Backend errors are caught per batch in `_serve`; this is anything else (a
            # BaseException, a bug here). Nothing would answer the requests any more: fail
            # them all and refuse new ones, rather than let every client wait forever.
            log.critical("the engine thread died", exc_info=True)
            with self._cv:
                self._stopping = True
                self._stop_message = "the engine stopped after an internal error"
                rows = self._waiting + list(self._running.values()) + self._admitted
                self._waiting, self._admitted, self._admitting = [], [], 0
                self._running.clear()
            for r in rows:
                self._finish(r, Failed(self._stop_message))

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._running or self._stopping):
                    self._cv.wait()
                if self._stopping and not self._running:
                    return
                dropped = [r for r in self._running.values() if r.cancelled]
                dropped += [r for r in self._waiting if r.cancelled]
                self._waiting = [r for r in self._waiting if not r.cancelled]
                if self._stopping and time.monotonic() > self._deadline:
                    dropped += [r for r in self._running.values() if not r.cancelled]
                running = len(self._running) - sum(r.key in self._running for r in dropped)
                # Prefills and decode steps alternate while requests keep arriving, so a
                # stream of arrivals cannot stall the rows already decoding.
                try:
                    admitted = [] if self._prefilled_last and running else self._admissible(running)
                except Exception:  # a backend bug: the request it choked on fails, not the server
                    log.exception("backend.can_add failed")
                    admitted = []
                    self._finish(self._waiting.pop(0), Failed("internal error in the engine"))
                self._waiting = self._waiting[len(admitted):]
                self._admitting, self._admitted = len(admitted), admitted
            try:
                self._tick(dropped, admitted)
            except Exception as e:  # a bug in a backend: fail the batch, keep serving
                log.exception("engine step failed")
                # `dropped` too: a failed backend.remove leaves them out of `_running`, unanswered.
                rows = list(self._running.values()) + admitted + dropped
                self._running.clear()
                try:
                    self.backend.remove([r.key for r in rows])
                except Exception:
                    log.exception("backend.remove failed after an engine error")
                for r in rows:
                    self._finish(r, Failed(f"internal error in the engine: {type(e).__name__}"))
            # Not in a `finally`: should the thread die, `_loop` still needs `_admitted`.
            with self._cv:
                self._admitting, self._admitted = 0, []

    def _admissible(self, running: int) -> list[_Request]:
        """The longest prefix of the queue that fits (first come, first served: no overtaking).

        At most `max_prefill_tokens` prompt tokens per prefill (but always one request): a
        burst of arrivals is prefilled in chunks with decode steps between them, so the
        first arrivals stream while later ones are still being prefilled."""
        n, tokens = 0, 0
        while n < len(self._waiting) and running + n < self.max_batch:
            tokens += self._waiting[n].prepared.prompt_tokens
            if n > 0 and tokens > self.max_prefill_tokens:
                break
            rows = [(r.prepared, r.options) for r in self._waiting[: n + 1]]
            if not self.backend.can_add(rows):
                break
            n += 1
        return self._waiting[:n]

    def _tick(self, dropped: list[_Request], admitted: list[_Request]) -> None:
        gone = [r.key for r in dropped if self._running.pop(r.key, None) is not None]
        if gone:
            self.backend.remove(gone)
        for r in dropped:
            if r.cancelled:  # its client is gone: this end is read by nobody
                self._finish(r, Finished("abort", r.prepared.prompt_tokens, r.completion_tokens))
            else:  # cut by the shutdown deadline: unanswered, so an error the client can retry
                self._finish(r, Failed("the server shut down before this answer was finished",
                                       503))
        if admitted:
            # Prefill new rows now; everyone decodes together from the next step on.
            admitted, updates = self._prefill(admitted)
            if not admitted:
                return
            with self._cv:  # one move, so `load` and `submit` never see them in neither place
                for r in admitted:
                    self._running[r.key] = r
                self._admitting = 0
            self._consume(updates)
            self._prefilled_last = True
        elif self._running:
            self._consume(self.backend.step())
            self.steps += 1
            self._prefilled_last = False
        self.max_rows_seen = max(self.max_rows_seen, len(self._running))

    def _prefill(self, admitted: list[_Request]) -> tuple[list[_Request], dict[int, Update]]:
        """backend.add; the rows that were prefilled and their first tokens. A failed prefill
        of several requests is retried one by one: one request's bad input (or one too big
        for memory) must fail that request only, not others admitted in the same prefill."""
        try:
            return admitted, self.backend.add([(r.key, r.prepared, r.options) for r in admitted])
        except Exception as e:
            # Only the new rows fail (DecodeState checks before it touches the live rows).
            log.exception("prefill failed")
            self.backend.remove([r.key for r in admitted])
            if len(admitted) == 1:
                status = 400 if isinstance(e, LalmError) else 500
                self._finish(admitted[0], Failed(f"prefill failed: {e}", status))
                return [], {}
        ok, updates = [], {}
        for r in admitted:
            rows, u = self._prefill([r])
            ok += rows
            updates.update(u)
        return ok, updates

    def _consume(self, updates: dict[int, Update]) -> None:
        finished = []
        for key, u in updates.items():
            r = self._running.get(key)
            if r is None:
                continue
            r.completion_tokens = u.completion_tokens
            entries = []
            if r.options.logprobs and u.token not in self.backend.stop_token_ids:
                entries = [self._logprob_entry(u, r.options.top_logprobs)]
            if (u.text or entries) and not r.cancelled:
                self._post(r, Delta(u.text, entries))
            if u.finish is not None:
                finished.append((r, u.finish))
        if finished:
            self.backend.remove([r.key for r, _ in finished])
            for r, reason in finished:
                self._running.pop(r.key, None)
                self._finish(r, Finished(reason, r.prepared.prompt_tokens, r.completion_tokens))

    def _logprob_entry(self, u: Update, top_n: int) -> dict:
        def entry(token: int, lp: float) -> dict:
            # `bytes` must be the token's own bytes: a byte-level token holding part of a
            # character has text "\ufffd", whose UTF-8 is not what the token adds to the
            # answer, and clients join `bytes` to rebuild characters split across tokens.
            raw = self.backend.token_bytes(token)
            return {"token": self.backend.token_text(token), "logprob": lp, "bytes": list(raw)}

        e = entry(u.token, u.logprob)
        e["top_logprobs"] = [entry(t, lp) for t, lp in u.top[:top_n]]
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
