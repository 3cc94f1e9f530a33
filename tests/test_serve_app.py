"""`lalm serve` routes on a deterministic fake model: OpenAI shapes, streaming, limits, abuse.

Run: .venv/bin/pytest -q tests/test_serve_app.py
Every abusive request must get a 4xx with OpenAI's error JSON and a message naming the
problem, and the server must answer a normal request right after it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tracemalloc
from urllib.parse import quote

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("lalm.audio")
sf = pytest.importorskip("soundfile")
from fastapi.testclient import TestClient

from lalm.serve.app import ServerConfig, create_app
from lalm.serve.engine import Engine
from lalm.serve.fake import FakeBackend
from lalm.serve.media import MediaPolicy, decode_audio
from lalm.serve.schemas import APIError

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def wav_bytes(seconds: float = 1.0, rate: int = 16000, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "ok.wav").write_bytes(wav_bytes(0.5))
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.wav").write_bytes(wav_bytes(0.5))
    os.symlink(outside / "secret.wav", d / "link.wav")
    return d, outside


@pytest.fixture(scope="module")
def client(media_dir):
    engine = Engine(FakeBackend(), max_batch=8, max_queue=8)
    config = ServerConfig(
        api_key=KEY,
        max_request_bytes=200_000,
        media=MediaPolicy(allowed_local_path=media_dir[0], max_audio_seconds=3.0,
                          max_bytes=200_000),
    )
    with TestClient(create_app(engine, config)) as c:
        yield c


def chat(client, body, headers=AUTH, **kw):
    return client.post("/v1/chat/completions", json=body, headers=headers, **kw)


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(),
                                                   "format": fmt}}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


GREEDY = {"model": "fake", "temperature": 0}


def assert_serving(client):
    r = chat(client, {**GREEDY, "messages": [{"role": "user", "content": "still there?"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_chat_completion_shape_and_usage(client):
    r = chat(client, {**GREEDY, "messages": user(audio_part(wav_bytes()),
                                                  {"type": "text", "text": "What is it?"})})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "fake"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_tokens"] > 25  # one second of audio is ~25 tokens
    assert u["completion_tokens"] >= 4


def _sse_events(text: str) -> list:
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] for e in events]


def test_stream_equals_non_stream(client):
    msgs = user(audio_part(wav_bytes(0.7)), {"type": "text", "text": "Describe."})
    whole = chat(client, {**GREEDY, "messages": msgs}).json()
    r = chat(client, {**GREEDY, "messages": msgs, "stream": True,
                      "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == \
        whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_max_tokens_stop_n_logprobs(client):
    msgs = [{"role": "user", "content": "tell me a long story"}]
    full = chat(client, {**GREEDY, "messages": msgs, "max_tokens": 12}).json()["choices"][0]
    text = full["message"]["content"]
    r = chat(client, {**GREEDY, "messages": msgs, "max_completion_tokens": 3}).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"
    assert text.startswith(r["choices"][0]["message"]["content"])
    # A stop string spanning the 2nd and 3rd words cuts the text just before it.
    words = text.split(" ")
    stop = words[2][-1:] + " " + words[3][:1] if len(words) > 3 else words[-1]
    r = chat(client, {**GREEDY, "messages": msgs, "max_tokens": 12, "stop": [stop]}).json()
    assert r["choices"][0]["message"]["content"] == text[:text.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
    r = chat(client, {**GREEDY, "messages": msgs, "max_tokens": 4, "n": 3, "logprobs": True,
                      "top_logprobs": 2}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in r["choices"]}) == 1  # greedy: all equal
    lp = r["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in lp) == r["choices"][0]["message"]["content"]
    assert all(len(e["top_logprobs"]) == 2 for e in lp)
    assert r["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"])
                                                  for c in r["choices"])


def test_seeded_sampling_is_reproducible(client):
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0,
            "seed": 7, "max_tokens": 8}
    a, b = (chat(client, body).json()["choices"][0]["message"]["content"] for _ in range(2))
    assert a == b


def test_audio_sources(client, media_dir):
    d, _ = media_dir
    data_url = "data:audio/wav;base64," + base64.b64encode(wav_bytes(0.5)).decode()
    for url in (data_url, str(d / "ok.wav"), f"file://{d / 'ok.wav'}", "ok.wav"):
        r = chat(client, {**GREEDY, "messages": user({"type": "audio_url",
                                                      "audio_url": {"url": url}})})
        assert r.status_code == 200, (url[:40], r.text)
    for fmt in ("FLAC", "OGG"):
        r = chat(client, {**GREEDY, "messages": user(audio_part(wav_bytes(0.5, 22050, fmt),
                                                                fmt.lower()))})
        assert r.status_code == 200, (fmt, r.text)


def test_percent_encoded_data_url_is_the_same_audio(client):
    """A data: URL without ;base64 carries the file's bytes percent-encoded (RFC 2397): the
    model must hear the same audio as from the base64 form, not bytes mangled as text."""
    wav = wav_bytes(0.5)
    answers = []
    for url in ("data:audio/wav;base64," + base64.b64encode(wav).decode(),
                "data:audio/wav," + quote(wav)):
        r = chat(client, {**GREEDY, "messages": user({"type": "audio_url",
                                                      "audio_url": {"url": url}})})
        assert r.status_code == 200, r.text
        answers.append((r.json()["choices"][0]["message"]["content"],
                        r.json()["usage"]["prompt_tokens"]))
    assert answers[0] == answers[1]


def test_null_options_mean_their_defaults(client):
    """OpenAI's API takes null for these (`"n": null` is n=1); clients that forward their unset
    options send exactly that, and must get an answer, not a 400."""
    msgs = [{"role": "user", "content": "hi"}]
    r = chat(client, {**GREEDY, "messages": msgs, "max_tokens": 3, "stream": None, "n": None,
                      "logprobs": None, "top_logprobs": None, "stop": None, "seed": None})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["message"]["content"] and choice["logprobs"] is None
    r = chat(client, {**GREEDY, "messages": msgs, "max_tokens": 3, "stream": True,
                      "stream_options": {"include_usage": None}})
    assert r.status_code == 200, r.text
    events = _sse_events(r.text)
    assert events[-1] == "[DONE]" and "usage" not in json.loads(events[-2])


def test_long_audio_is_refused_before_it_is_decoded():
    """Silence compresses ~1000x in FLAC, so a small upload can hold hours of audio: its
    length is read from the header and refused there, not after decoding it into memory
    (20 minutes here would take ~80 MB; 25 MB of such FLAC, ~90 GB)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", 16000, 1, format="FLAC") as f:
        for _ in range(20):
            f.write(np.zeros(16000 * 60, np.int16))
    raw = buf.getvalue()
    assert len(raw) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(APIError, match="longer than this server's limit of 60 s"):
            decode_audio(raw, "file", MediaPolicy(max_audio_seconds=60))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000, f"decoded {peak / 1e6:.0f} MB to find it too long"


def test_models_health_and_page(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake"
    page = client.get("/")
    assert page.status_code == 200 and "MediaRecorder" not in page.text  # logic lives in app.js
    assert "/static/app.js" in page.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "MediaRecorder" in js.text


def test_transcriptions(client):
    files = {"file": ("a.wav", wav_bytes(1.0), "audio/wav")}
    r = client.post("/v1/audio/transcriptions", files=files, data={"model": "fake"}, headers=AUTH)
    assert r.status_code == 200, r.text
    text = r.json()["text"]
    assert text
    r = client.post("/v1/audio/transcriptions", files=files,
                    data={"model": "fake", "response_format": "text"}, headers=AUTH)
    assert r.status_code == 200 and r.text == text


def _abuse_cases(media_dir):
    d, outside = media_dir
    ok_msgs = [{"role": "user", "content": "hi"}]
    big = base64.b64encode(os.urandom(190_000)).decode()
    return {
        "malformed JSON": ({"content": b'{"messages": [', "headers": {**AUTH, "content-type":
                           "application/json"}}, 400, "could not parse the JSON"),
        "JSON not an object": ({"content": b"[1, 2]", "headers": AUTH}, 400, "must be an object"),
        "wrong type max_tokens": ({"json": {"messages": ok_msgs, "max_tokens": "5"}}, 400,
                                  "max_tokens"),
        "messages not a list": ({"json": {"messages": "hi"}}, 400, "messages"),
        "content is a number": ({"json": {"messages": [{"role": "user", "content": 5}]}}, 400,
                                "messages[0].content"),
        "unknown role": ({"json": {"messages": [{"role": "wizard", "content": "x"}]}}, 400,
                         "messages[0].role"),
        "no messages": ({"json": {"messages": []}}, 400, "messages"),
        "temperature too high": ({"json": {"messages": ok_msgs, "temperature": 9}}, 400,
                                 "temperature"),
        "image part": ({"json": {"messages": user({"type": "image_url",
                                                    "image_url": {"url": "x"}})}}, 400,
                       "image_url"),
        "bad audio format": ({"json": {"messages": user({"type": "input_audio", "input_audio":
                                                          {"data": "AAAA", "format": "webm"}})}},
                             400, "input_audio.format"),
        "bad base64": ({"json": {"messages": user({"type": "input_audio", "input_audio":
                                                    {"data": "not base64!!", "format": "wav"}})}},
                       400, "not valid base64"),
        "non-audio bytes": ({"json": {"messages": user(audio_part(b"hello, I am text" * 50))}},
                            400, "messages[0].content[0]"),
        "empty audio": ({"json": {"messages": user(audio_part(b""))}}, 400, "empty"),
        "audio too long": ({"json": {"messages": user(audio_part(wav_bytes(4.0, 8000)))}}, 400,
                           "longer than this server's limit"),
        "oversized body": ({"json": {"messages": user(audio_part(b"x")), "pad": big}}, 413,
                           "larger than this server's limit"),
        "path outside allowed folder": ({"json": {"messages": user({"type": "audio_url",
                                        "audio_url": {"url": str(outside / "secret.wav")}})}},
                                        400, "outside the allowed media folder"),
        "dot-dot escape": ({"json": {"messages": user({"type": "audio_url", "audio_url":
                           {"url": f"{d}/../{outside.name}/secret.wav"}})}}, 400,
                           "outside the allowed media folder"),
        "symlink escape": ({"json": {"messages": user({"type": "audio_url", "audio_url":
                           {"url": str(d / "link.wav")}})}}, 400, "outside the allowed"),
        "missing file": ({"json": {"messages": user({"type": "audio_url", "audio_url":
                         {"url": str(d / "nope.wav")}})}}, 400, "no such file"),
        "remote URL not allowed": ({"json": {"messages": user({"type": "audio_url", "audio_url":
                                   {"url": "https://example.com/a.wav"}})}}, 400,
                                   "remote media URLs are disabled"),
        "odd URL scheme": ({"json": {"messages": user({"type": "audio_url", "audio_url":
                           {"url": "ftp://example.com/a.wav"}})}}, 400, "unsupported URL scheme"),
        "audio in system message": ({"json": {"messages": [{"role": "system", "content":
                                    [audio_part(wav_bytes(0.2))]}, *ok_msgs]}}, 400, "system"),
        "unknown model": ({"json": {"model": "gpt-9", "messages": ok_msgs}}, 404,
                          "does not exist"),
        "max_tokens beyond context": ({"json": {"messages": ok_msgs, "max_tokens": 10**6}}, 400,
                                      "maximum context length"),
        "deeply nested JSON": ({"content": b"[" * 100_000, "headers": AUTH}, 400, "nested"),
        "lone surrogate": ({"content": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                            "headers": AUTH}, 400, "lone surrogate"),
        "seed out of range": ({"json": {"messages": ok_msgs, "seed": 10**30}}, 400, "seed"),
        "top_logprobs without logprobs": ({"json": {"messages": ok_msgs, "top_logprobs": 2}},
                                          400, "logprobs"),
    }


ABUSE_NAMES = [
    "malformed JSON", "JSON not an object", "wrong type max_tokens", "messages not a list",
    "content is a number", "unknown role", "no messages", "temperature too high", "image part",
    "bad audio format", "bad base64", "non-audio bytes", "empty audio", "audio too long",
    "oversized body", "path outside allowed folder", "dot-dot escape", "symlink escape",
    "missing file", "remote URL not allowed", "odd URL scheme", "audio in system message",
    "unknown model", "max_tokens beyond context", "top_logprobs without logprobs",
    "deeply nested JSON", "lone surrogate", "seed out of range",
]


@pytest.mark.parametrize("name", ABUSE_NAMES)
def test_abuse_is_a_clear_4xx_and_server_keeps_serving(client, media_dir, name):
    kwargs, status, needle = _abuse_cases(media_dir)[name]
    kwargs = dict(kwargs)
    kwargs.setdefault("headers", AUTH)
    r = client.post("/v1/chat/completions", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"], err
    assert_serving(client)


@pytest.mark.parametrize("headers,needle", [
    ({}, "Missing API key"),
    ({"Authorization": "Bearer wrong"}, "Incorrect API key"),
    ({"Authorization": KEY}, "Incorrect API key"),  # no Bearer scheme
])
def test_wrong_api_key_is_401(client, headers, needle):
    for method, path in (("post", "/v1/chat/completions"), ("get", "/v1/models"),
                         ("post", "/v1/audio/transcriptions")):
        r = getattr(client, method)(path, headers=headers,
                                    **({"json": GREEDY} if method == "post" else {}))
        assert r.status_code == 401, (path, r.text)
        assert needle in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert_serving(client)


def test_transcription_abuse(client):
    wav = wav_bytes(0.5)
    cases = [
        ({"data": {"model": "fake"}}, 400, "file"),  # no file
        ({"files": {"file": ("a.wav", wav)}, "data": {}}, 400, "model"),
        ({"files": {"file": ("a.wav", wav)}, "data": {"model": "fake", "response_format": "srt"}},
         400, "response_format"),
        ({"files": {"file": ("a.txt", b"plain text, not audio" * 20)}, "data": {"model": "fake"}},
         400, "file"),
        ({"files": {"file": ("a.wav", wav)}, "data": {"model": "fake", "temperature": "hot"}},
         400, "temperature"),
        ({"content": b"not multipart", "headers": {**AUTH, "content-type": "text/plain"}}, 400,
         "multipart"),
        ({"files": {"file": ("a.wav", os.urandom(250_000))}, "data": {"model": "fake"}}, 413,
         "larger than"),
    ]
    for kwargs, status, needle in cases:
        kwargs.setdefault("headers", AUTH)
        r = client.post("/v1/audio/transcriptions", **kwargs)
        assert r.status_code == status, (needle, r.text)
        assert needle in r.json()["error"]["message"], r.json()
        assert_serving(client)


def test_unknown_route_and_method(client):
    r = client.get("/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()


def test_remote_media_only_when_allowed(tmp_path):
    import functools
    import http.server
    import threading

    (tmp_path / "clip.wav").write_bytes(wav_bytes(0.5))
    (tmp_path / "big.wav").write_bytes(wav_bytes(3.0))  # 96 kB, over the 50 kB cap below
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    config = ServerConfig(media=MediaPolicy(allow_remote=True, max_bytes=50_000))
    try:
        with TestClient(create_app(Engine(FakeBackend()), config)) as c:
            def ask(url):
                return chat(c, {**GREEDY, "messages": user({"type": "audio_url",
                                                            "audio_url": {"url": url}})}, {})
            assert ask(f"{base}/clip.wav").status_code == 200
            r = ask(f"{base}/missing.wav")
            assert r.status_code == 400 and "HTTP 404" in r.json()["error"]["message"]
            r = ask(f"{base}/big.wav")
            assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
            r = ask("http://127.0.0.1:1/unreachable.wav")
            assert r.status_code == 400 and "could not fetch" in r.json()["error"]["message"]
    finally:
        httpd.shutdown()


def test_mp3_input_and_streamed_n_choices(client):
    r = chat(client, {**GREEDY, "messages": user(audio_part(wav_bytes(0.5, 16000, "MP3"), "mp3"))})
    assert r.status_code == 200, r.text
    r = chat(client, {**GREEDY, "messages": [{"role": "user", "content": "two please"}], "n": 2,
                      "max_tokens": 6, "stream": True})
    chunks = [json.loads(e) for e in _sse_events(r.text)[:-1]]
    texts = {0: "", 1: ""}
    for ch in chunks:
        for c in ch["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
    assert texts[0] and texts[0] == texts[1]  # greedy: both choices equal
    assert sum(1 for ch in chunks for c in ch["choices"] if c["finish_reason"]) == 2


def _mutations(rng, value, depth=0):
    """Random variants of a JSON value: wrong types, odd numbers, deleted or extra keys."""
    odd = [None, True, 0, -1, 2**70, 1e308, "", "x" * 300, "\u00e9\U0001f600", [], {}, [None],
           {"type": "input_audio"}, "data:audio/wav;base64,@@@", "../../etc/passwd"]
    choice = rng.integers(4)
    if isinstance(value, dict) and value and choice == 0:
        key = list(value)[rng.integers(len(value))]
        return {k: v for k, v in value.items() if k != key}  # drop a key
    if isinstance(value, dict) and value and choice == 1 and depth < 6:
        key = list(value)[rng.integers(len(value))]
        return {**value, key: _mutations(rng, value[key], depth + 1)}
    if isinstance(value, list) and value and choice == 1 and depth < 6:
        i = int(rng.integers(len(value)))
        return value[:i] + [_mutations(rng, value[i], depth + 1)] + value[i + 1:]
    return odd[rng.integers(len(odd))]


def test_fuzzed_requests_never_5xx(client, media_dir, seed=0, n=100):
    rng = np.random.default_rng(seed)
    valid = {"model": "fake", "temperature": 0.5, "max_tokens": 3, "stop": ["x"], "n": 1,
             "logprobs": False, "messages": [
                 {"role": "system", "content": "Be brief."},
                 {"role": "user", "content": [
                     audio_part(wav_bytes(0.2)),
                     {"type": "audio_url", "audio_url": {"url": "ok.wav"}},
                     {"type": "text", "text": "What is it?"}]}]}
    statuses = []
    for _ in range(n):
        body = valid
        for _ in range(int(rng.integers(1, 4))):
            body = _mutations(rng, body)
        r = client.post("/v1/chat/completions", content=json.dumps(body).encode(),
                        headers={**AUTH, "content-type": "application/json"})
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
        statuses.append(r.status_code)
    assert 200 in statuses and 400 in statuses  # both kinds were exercised
    assert_serving(client)
