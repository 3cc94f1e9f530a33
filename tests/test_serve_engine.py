"""The serving engine's scheduling on a fake backend: join/leave between steps, 429, cancel,
shutdown, UTF-8-safe and stop-string-safe streaming, and disconnects over real HTTP.

Run: .venv/bin/pytest -q tests/test_serve_engine.py
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from lalm.serve.engine import (
    Delta,
    Engine,
    Failed,
    Finished,
    Options,
    Prepared,
    QueueFull,
    ShuttingDown,
)
from lalm.serve.fake import FakeBackend


def run(coro):
    return asyncio.run(coro)


def prep(backend, text: str) -> Prepared:
    return backend.prepare([{"role": "user", "content": text}])


async def collect(handle) -> tuple[str, object]:
    text, end = [], None
    async for ev in handle:
        if isinstance(ev, Delta):
            text.append(ev.text)
        else:
            end = ev
    return "".join(text), end


async def wait_until(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_requests_join_and_leave_between_steps():
    backend = FakeBackend(step_delay_s=0.002, min_tokens=10**6)  # never emits EOS
    engine = Engine(backend, max_batch=4, max_queue=4)
    engine.start()

    async def main():
        long = engine.submit(prep(backend, "long"), Options(max_new_tokens=60))
        task_long = asyncio.create_task(collect(long))
        await wait_until(lambda: engine.steps >= 5)
        short = engine.submit(prep(backend, "short"), Options(max_new_tokens=5))
        _text_short, end_short = await collect(short)
        running_after_short = engine.load[0]
        _text_long, end_long = await task_long
        return end_short, end_long, running_after_short

    end_short, end_long, running_after_short = run(main())
    engine.shutdown(1)
    assert end_short.reason == end_long.reason == "length"
    assert (end_short.completion_tokens, end_long.completion_tokens) == (5, 60)
    # The short request joined a running batch (2 rows), left it, and the long one went on.
    sizes = backend.batch_sizes
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1
    first_two, last_two = sizes.index(2), len(sizes) - 1 - sizes[::-1].index(2)
    assert all(s == 2 for s in sizes[first_two:last_two + 1])
    assert running_after_short == 1
    assert backend.rows == {}  # finished rows were removed from the backend


def test_batched_equals_alone_and_all_complete():
    backend = FakeBackend()
    engine = Engine(backend, max_batch=8, max_queue=64)
    engine.start()
    prompts = [f"question number {i}" for i in range(20)]

    async def alone():
        return [await collect(engine.submit(prep(backend, p), Options(max_new_tokens=16)))
                for p in prompts]

    async def together():
        hs = [engine.submit(prep(backend, p), Options(max_new_tokens=16)) for p in prompts]
        return await asyncio.gather(*(collect(h) for h in hs))

    a, b = run(alone()), run(together())
    engine.shutdown(1)
    assert [t for t, _ in a] == [t for t, _ in b]
    assert all(isinstance(e, Finished) for _, e in b)
    assert max(backend.batch_sizes) == 8  # batch capped at max_batch, queue held the rest


def test_full_queue_raises_and_cancel_frees_slot():
    backend = FakeBackend(step_delay_s=0.002, min_tokens=10**6)
    engine = Engine(backend, max_batch=2, max_queue=1)
    engine.start()

    async def main():
        hs = [engine.submit(prep(backend, str(i)), Options(max_new_tokens=10**4))
              for i in range(3)]
        with pytest.raises(QueueFull, match="busy"):
            engine.submit(prep(backend, "one too many"), Options(max_new_tokens=1))
        await wait_until(lambda: len(backend.rows) == 2)
        hs[0].cancel()  # like a client disconnect: the waiting request takes its row
        _, end0 = await collect(hs[0])
        await wait_until(lambda: hs[2].key in backend.rows)
        assert hs[0].key not in backend.rows
        for h in hs[1:]:
            h.cancel()
        ends = [await collect(h) for h in hs[1:]]
        return end0, ends

    end0, ends = run(main())
    assert end0.reason == "abort" and all(e.reason == "abort" for _, e in ends)
    assert backend.rows == {} and engine.load == (0, 0)
    engine.shutdown(1)


def test_shutdown_finishes_running_and_refuses_waiting():
    backend = FakeBackend(step_delay_s=0.002, min_tokens=10**6)
    engine = Engine(backend, max_batch=1, max_queue=4)
    engine.start()

    async def main():
        running = engine.submit(prep(backend, "a"), Options(max_new_tokens=40))
        waiting = engine.submit(prep(backend, "b"), Options(max_new_tokens=40))
        await wait_until(lambda: engine.steps >= 2)
        t = asyncio.get_running_loop().run_in_executor(None, engine.shutdown, 30)
        r_run, r_wait = await asyncio.gather(collect(running), collect(waiting))
        await t
        with pytest.raises(ShuttingDown):
            engine.submit(prep(backend, "c"), Options(max_new_tokens=1))
        return r_run, r_wait

    (_, end_run), (_, end_wait) = run(main())
    assert isinstance(end_run, Finished) and end_run.completion_tokens == 40
    assert isinstance(end_wait, Failed) and end_wait.status == 503


def test_rows_cut_by_the_shutdown_deadline_fail_with_503():
    """A row still decoding when the grace runs out was not answered: its client gets a 503
    it can retry, not an end with a finish_reason ("abort") that OpenAI clients don't know."""
    backend = FakeBackend(step_delay_s=0.002, min_tokens=10**6)
    engine = Engine(backend, max_batch=1)
    engine.start()

    async def main():
        h = engine.submit(prep(backend, "a"), Options(max_new_tokens=10**5))
        await wait_until(lambda: engine.steps >= 2)
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown, 0.05)
        return await collect(h)

    _, end = run(main())
    assert isinstance(end, Failed) and end.status == 503, end
    assert "shut down" in end.message
    assert backend.rows == {}


class ByteBackend(FakeBackend):
    """Emits the UTF-8 bytes of a fixed answer, one byte per token (splits characters)."""

    answer = "café, déjà vu — ok. STOP here".encode()

    def _pick(self, row):
        i = len(row.tokens)
        return self.answer[i] + 1 if i < len(self.answer) else 0

    def token_bytes(self, token):
        return bytes([token - 1]) if token else b""


@pytest.mark.parametrize("stop,expected", [
    ((), "café, déjà vu — ok. STOP here"),
    ((" STOP",), "café, déjà vu — ok."),
    (("vu —", "ok"), "café, déjà "),
])
def test_stream_never_splits_characters_or_leaks_stop(stop, expected):
    backend = ByteBackend()
    engine = Engine(backend)
    engine.start()

    async def main():
        h = engine.submit(prep(backend, "x"), Options(max_new_tokens=100, stop=stop))
        return [ev async for ev in h]

    events = run(main())
    engine.shutdown(1)
    deltas = [e.text for e in events if isinstance(e, Delta)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == expected
    assert events[-1].reason == "stop"
    if stop:  # no piece of the stop string was ever sent
        sent = ""
        for d in deltas:
            sent += d
            assert not any(s in sent for s in stop)


def test_http_disconnect_frees_the_row():
    pytest.importorskip("fastapi")
    from lalm.serve.app import create_app
    from lalm.serve.cli import background_server

    backend = FakeBackend(step_delay_s=0.005, min_tokens=10**6)
    engine = Engine(backend, max_batch=4, max_queue=4)
    with background_server(create_app(engine)) as url:
        host, port = url.removeprefix("http://").split(":")
        for stream in (True, False):
            body = json.dumps({"messages": [{"role": "user", "content": "go on forever"}],
                               "max_tokens": 4000, "temperature": 0, "stream": stream}).encode()
            # A raw socket, so the test decides exactly when the client vanishes: once its
            # row is decoding in the engine.
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 20
            while not backend.rows:
                assert time.monotonic() < deadline, "request never started decoding"
                time.sleep(0.005)
            steps = engine.steps
            sock.close()
            while backend.rows or engine.load != (0, 0):
                assert time.monotonic() < deadline, f"row not freed after disconnect ({stream=})"
                time.sleep(0.005)
            assert engine.steps - steps < 3000  # freed long before its 4000 tokens
        r = httpx.get(f"{url}/health")
        assert r.json()["running"] == 0


def test_http_full_queue_is_429():
    pytest.importorskip("fastapi")
    from lalm.serve.app import create_app
    from lalm.serve.cli import background_server

    backend = FakeBackend(step_delay_s=0.005, min_tokens=10**6)
    engine = Engine(backend, max_batch=1, max_queue=0)
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4000, "stream": True}
    with background_server(create_app(engine)) as url, httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept alive: a dropped iterator closes the connection
            next(lines)
            r2 = c.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
            assert r2.status_code == 429
            assert r2.json()["error"]["type"] == "rate_limit_error"
            assert "busy" in r2.json()["error"]["message"]
        deadline = time.monotonic() + 20
        while engine.load != (0, 0):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r3 = c.post(f"{url}/v1/chat/completions", json={**body, "stream": False,
                                                          "max_tokens": 3})
        assert r3.status_code == 200, r3.text


def test_http_more_answers_than_the_server_holds_is_400_not_429():
    pytest.importorskip("fastapi")
    from lalm.serve.app import create_app
    from lalm.serve.cli import background_server

    engine = Engine(FakeBackend(), max_batch=2, max_queue=1)
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    with background_server(create_app(engine)) as url, httpx.Client(timeout=30) as c:
        r = c.post(f"{url}/v1/chat/completions", json={**body, "n": 4})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "n"
        assert "max_batch 2 + max_queue 1 = 3" in r.json()["error"]["message"]
        r = c.post(f"{url}/v1/chat/completions", json={**body, "n": 3})  # fits an idle server
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 3


class FailingPrefill(FakeBackend):
    """Prefill raises for prompts containing 'boom' (like a bad input found only at prefill)."""

    def add(self, rows):
        if any(p.prompt == BOOM for _, p, _ in rows):
            from lalm.errors import ContextLengthError

            raise ContextLengthError("prompt 0 is too long")
        return super().add(rows)


BOOM = FakeBackend().prepare([{"role": "user", "content": "boom"}]).prompt


def test_failed_prefill_fails_only_its_request():
    backend = FailingPrefill(step_delay_s=0.002, min_tokens=10**6)
    engine = Engine(backend, max_batch=4)
    engine.start()

    async def main():
        ok = engine.submit(prep(backend, "fine"), Options(max_new_tokens=30))
        task = asyncio.create_task(collect(ok))
        await wait_until(lambda: engine.steps >= 3)
        bad = engine.submit(prep(backend, "boom"), Options(max_new_tokens=30))
        return await collect(bad), await task

    (_, bad_end), (_, ok_end) = run(main())
    engine.shutdown(1)
    assert isinstance(bad_end, Failed) and bad_end.status == 400 and "too long" in bad_end.message
    assert isinstance(ok_end, Finished) and ok_end.completion_tokens == 30


def test_http_oversized_bodies_are_413_and_server_keeps_serving():
    """Over real HTTP: a declared, a 10x and a chunked (no Content-Length) oversized body."""
    pytest.importorskip("fastapi")
    from lalm.serve.app import ServerConfig, create_app
    from lalm.serve.cli import background_server

    config = ServerConfig(max_request_bytes=1_000_000)
    with background_server(create_app(Engine(FakeBackend()), config)) as url:
        def chunks():
            for _ in range(30):
                yield b"a" * 100_000

        big = b'{"messages": "' + b"a" * 10_000_000 + b'"}'
        for content in (big[:2_000_000], big, chunks()):
            r = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=60,
                           headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
            assert "larger than this server's limit" in r.json()["error"]["message"]
        ok = httpx.post(f"{url}/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert ok.status_code == 200


def test_the_kv_cache_is_sized_to_the_gpus_free_memory(tiny, monkeypatch):
    """The 7B's cache is 512 KiB a token in bf16: the defaults' 32 rows x 4,096 tokens (64 GiB)
    beside ~16 GiB of weights failed every request on an 80 GB card, at the first prefill."""
    import torch

    from lalm.config import ModelConfig
    from lalm.errors import ConfigError
    from lalm.serve.backend import LALMBackend, cache_rows

    text = ModelConfig.preset("qwen2-audio-7b").text
    gib = 2**30
    assert cache_rows(text, torch.bfloat16, 4096, 63 * gib, 32) == 28  # 0.9 x 63 GiB / 2 GiB a row
    assert cache_rows(text, torch.bfloat16, 4096, 130 * gib, 32) == 32  # an H200: all of them
    with pytest.raises(ConfigError, match="--max-model-len"):
        cache_rows(text, torch.bfloat16, 4096, gib, 32)
    assert LALMBackend(tiny, max_batch=32).max_batch == 32  # the CPU: as asked
    per_row = 2 * tiny.config.text.num_hidden_layers * tiny.config.text.num_key_value_heads \
        * tiny.config.text.head_dim * 4 * 1024  # fp32, max_model_len 1024
    monkeypatch.setattr(type(tiny), "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(5.5 * per_row / 0.9), 99 * per_row))
    assert LALMBackend(tiny, max_batch=32, max_model_len=1024).max_batch == 5
