"""The server's lifecycle under failure: one request's bad prefill, a dying engine thread, a
failing backend.remove at shutdown, and uvicorn's shutdown with answers queued and running.
Failures are injected into the fake backend; waits have timeouts, so a hang (the defect)
fails the test instead of stalling it.

Run: .venv/bin/pytest -q tests/test_serve_lifecycle.py
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from test_serve_engine import collect as collect_all
from test_serve_engine import prep

from lalm.errors import ChatFormatError
from lalm.serve.engine import Engine, Failed, Finished, Options, ShuttingDown
from lalm.serve.fake import FakeBackend


async def collect(handle, timeout: float = 5.0) -> tuple[str, object]:
    return await asyncio.wait_for(collect_all(handle), timeout)  # no answer in time: the request hangs


def wait_until(cond, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached"
        time.sleep(0.005)


BOOM = prep(FakeBackend(), "boom").prompt


class BadPromptBackend(FakeBackend):
    """Prefill refuses the prompt 'boom', as DecodeState.add refuses a bad row: the whole add."""

    def add(self, rows):
        if any(p.prompt == BOOM for _, p, _ in rows):
            raise ChatFormatError("prompt is empty")
        return super().add(rows)


def test_a_bad_prompt_fails_only_itself_when_prefilled_with_others():
    backend = BadPromptBackend(min_tokens=10**6)
    engine = Engine(backend, max_batch=4)

    async def main():
        # Submitted before the engine starts, so all three are admitted in one prefill.
        hs = [engine.submit(prep(backend, t), Options(max_new_tokens=5))
              for t in ("fine", "boom", "also fine")]
        engine.start()
        return [await collect(h) for h in hs]

    (ok_text, ok), (_, bad), (_, ok2) = asyncio.run(main())
    engine.shutdown(1)
    assert isinstance(bad, Failed) and bad.status == 400 and "empty" in bad.message
    assert isinstance(ok, Finished) and ok.completion_tokens == 5, ok
    assert isinstance(ok2, Finished) and ok2.completion_tokens == 5, ok2
    assert ok_text == asyncio.run(_alone("fine"))  # as if it had been prefilled alone
    assert backend.rows == {} and engine.load == (0, 0)


async def _alone(text: str) -> str:
    backend = FakeBackend(min_tokens=10**6)
    engine = Engine(backend)
    engine.start()
    out, _ = await collect(engine.submit(prep(backend, text), Options(max_new_tokens=5)))
    await asyncio.get_running_loop().run_in_executor(None, engine.shutdown, 1)
    return out


class Fatal(BaseException):
    """Not an Exception: gets past the engine's per-batch `except Exception`."""


class DyingBackend(FakeBackend):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.die = threading.Event()

    def step(self):
        if self.die.is_set():
            raise Fatal("the backend took the thread down")
        return super().step()


def test_a_dead_engine_thread_fails_its_requests_and_refuses_new_ones():
    backend = DyingBackend(step_delay_s=0.002, min_tokens=10**6)
    engine = Engine(backend, max_batch=1, max_queue=4)
    engine.start()

    async def main():
        running = engine.submit(prep(backend, "a"), Options(max_new_tokens=10**5))
        waiting = engine.submit(prep(backend, "b"), Options(max_new_tokens=10**5))
        while engine.steps < 2:
            await asyncio.sleep(0.005)
        backend.die.set()
        ends = [(await collect(h))[1] for h in (running, waiting)]
        with pytest.raises(ShuttingDown, match="internal error"):
            engine.submit(prep(backend, "c"), Options(max_new_tokens=1))
        return ends

    ends = asyncio.run(main())
    assert all(isinstance(e, Failed) and e.status == 500 for e in ends), ends
    assert not engine.alive and engine.load == (0, 0)
    engine.shutdown(1)


class BrokenRemove(FakeBackend):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.broken = False

    def remove(self, keys):
        if self.broken:
            raise RuntimeError("remove failed")
        super().remove(keys)


def test_rows_cut_at_shutdown_are_answered_even_if_remove_fails():
    backend = BrokenRemove(step_delay_s=0.002, min_tokens=10**6)
    engine = Engine(backend, max_batch=1)
    engine.start()

    async def main():
        h = engine.submit(prep(backend, "a"), Options(max_new_tokens=10**5))
        while engine.steps < 2:
            await asyncio.sleep(0.005)
        backend.broken = True  # the shutdown deadline drops the row: its remove raises
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown, 0.05)
        return await collect(h)

    _, end = asyncio.run(main())
    assert isinstance(end, Failed) and end.status == 500, end
    assert not engine.alive


class CountingEngine(Engine):
    submitted = 0

    def submit(self, prepared, options):
        h = super().submit(prepared, options)
        self.submitted += 1
        return h


def test_server_shutdown_503s_the_queue_and_rows_past_the_grace():
    """uvicorn's shutdown (Ctrl-C, SIGTERM; here the end of `background_server`) with one
    answer that fits in the grace, one that does not, and one queued behind them."""
    pytest.importorskip("fastapi")
    import httpx

    from lalm.serve.app import ServerConfig, create_app
    from lalm.serve.cli import background_server

    backend = FakeBackend(step_delay_s=0.01, min_tokens=10**6)
    engine = CountingEngine(backend, max_batch=2, max_queue=4)
    results = {}

    def ask(name, max_tokens, stream):
        body = {"messages": [{"role": "user", "content": name}], "max_tokens": max_tokens,
                "stream": stream}
        with httpx.Client(timeout=30) as c:
            if not stream:
                r = c.post(f"{url}/v1/chat/completions", json=body)
                results[name] = (r.status_code, r.json())
                return
            with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                results[name] = [line for line in r.iter_lines() if line]

    app = create_app(engine, ServerConfig(shutdown_grace_s=2.0))
    threads = []
    with background_server(app) as url:
        for name, n, stream in (("short", 100, True), ("long", 4000, True), ("queued", 5, False)):
            threads.append(threading.Thread(target=ask, args=(name, n, stream)))
            threads[-1].start()
            wait_until(lambda: engine.submitted == len(threads), what=f"{name} submitted")
        assert engine.load == (2, 1)  # short and long decode, queued waits
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3.5  # the grace (2 s), not uvicorn's own wait (4 s, was 5)
    for t in threads:
        t.join(10)
    status, body = results["queued"]
    assert status == 503 and "shutting down" in body["error"]["message"], body
    assert results["short"][-1] == "data: [DONE]"
    assert json.loads(results["short"][-2][6:])["choices"][0]["finish_reason"] == "length"
    long = results["long"]
    assert long[-1] == "data: [DONE]", long[-3:]
    error = json.loads(long[-2][6:])["error"]
    assert "shut down before this answer was finished" in error["message"], error
