"""OpenAI-compatibility checks for `lalm serve`, driven by the official `openai` client.

Run: .venv/bin/pytest -q tests/test_serve_audit.py
Each test pins a defect a client would hit: a request field that changes the answer must
be honoured or refused with a 400 naming it (never silently dropped), and response fields
must mean what OpenAI's do.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
sf = pytest.importorskip("soundfile")

from test_serve_engine import ByteBackend

from lalm.serve.app import ServerConfig, create_app
from lalm.serve.cli import background_server
from lalm.serve.engine import Engine
from lalm.serve.fake import FakeBackend

MSGS = [{"role": "user", "content": "hi"}]


def wav_bytes(seconds: float = 0.5, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client():
    with background_server(create_app(Engine(FakeBackend()), ServerConfig())) as url:
        yield _client(url)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("kwargs,param", [
    ({"tools": TOOLS}, "tools"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [TOOLS[0]["function"]]}, "functions"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"15": 100}}, "logit_bias"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
     "modalities"),
    ({"extra_body": {"min_p": 0.1}}, "min_p"),
    ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
])
def test_fields_that_change_the_answer_are_refused_not_ignored(client, kwargs, param):
    """Before: all of these got a 200 with plain free text, as if honoured (a LangChain
    `with_structured_output` or tool-calling agent then fails far from the cause)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fake", messages=MSGS, max_tokens=3, **kwargs)
    err = e.value.body
    assert err["param"] == param and err["code"] == "unsupported_parameter", err
    assert "not supported" in err["message"]


def test_neutral_values_and_harmless_fields_are_accepted(client):
    """What clients forwarding their defaults send must still work, and give the same answer."""
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "hi", "name": "bob"}]
    plain = client.chat.completions.create(model="fake", messages=msgs, max_tokens=4,
                                           temperature=0)
    same = client.chat.completions.create(
        model="fake", messages=msgs, max_tokens=4, temperature=0,
        tools=TOOLS, tool_choice="none", response_format={"type": "text"},
        presence_penalty=0, frequency_penalty=0.0, logit_bias={}, modalities=["text"],
        user="u-1", metadata={"k": "v"}, store=False, parallel_tool_calls=False,
        extra_body={"top_k": -1, "repetition_penalty": 1.0, "min_tokens": 0})
    assert same.choices[0].message.content == plain.choices[0].message.content


class SplitCharBackend(ByteBackend):
    """Answers "é€" as one byte per token, so characters are split across tokens."""

    answer = "é€".encode()


def test_logprob_bytes_are_the_tokens_own_bytes():
    """OpenAI's `bytes` exists so clients can rebuild characters split across tokens.
    Before: it was the UTF-8 of the token's text, "\\ufffd" for a partial character, so
    joining it gave b"\\xef\\xbf\\xbd..." instead of the answer."""
    with background_server(create_app(Engine(SplitCharBackend()), ServerConfig())) as url:
        c = _client(url)
        r = c.chat.completions.create(model="fake", messages=MSGS, temperature=0,
                                      logprobs=True, top_logprobs=1)
        choice = r.choices[0]
        assert choice.message.content == "é€"
        entries = choice.logprobs.content
        assert len(entries) == 5
        assert b"".join(bytes(e.bytes) for e in entries) == "é€".encode()
        assert all(e.top_logprobs[0].bytes == e.bytes for e in entries)
        streamed = b""
        for ch in c.chat.completions.create(model="fake", messages=MSGS, temperature=0,
                                            logprobs=True, stream=True):
            if ch.choices and ch.choices[0].logprobs:
                streamed += b"".join(bytes(e.bytes) for e in ch.choices[0].logprobs.content)
        assert streamed == "é€".encode()


def test_streamed_transcription_is_refused(client):
    """Before: `stream=True` was answered with JSON, which the SDK reads as an empty event
    stream: no transcript and no error."""
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="fake", file=("a.wav", wav_bytes()),
                                           stream=True)
    assert e.value.body["param"] == "stream"
    r = client.audio.transcriptions.create(model="fake", file=("a.wav", wav_bytes()),
                                           stream=False)
    assert r.text


def test_ids_past_the_tokenizer_have_no_bytes_not_an_error(tiny):
    """An id between the tokenizer's size and the embedding's (the 7B has 4,383 such ids) in
    top_logprobs raised ValueError in the engine thread, failing the request."""
    from lalm.serve.backend import LALMBackend

    backend = LALMBackend(tiny)
    n = tiny.tokenizer.vocab_size
    assert backend.token_bytes(n) == b"" and backend.token_text(n + 7) == ""
    assert backend.token_bytes(tiny.tokenizer.im_end_id) == b"<|im_end|>"


def test_vllm_extras_reach_the_engine_with_vllms_meanings():
    """top_k -1 is vLLM's "off" (lalm's 0); min_tokens above max_tokens is a 400."""
    seen = []

    class Recording(FakeBackend):
        def add(self, rows):
            seen.extend(o for _, _, o in rows)
            return super().add(rows)

    with background_server(create_app(Engine(Recording()), ServerConfig())) as url:
        c = _client(url)
        c.chat.completions.create(model="fake", messages=MSGS, max_tokens=6,
                                  extra_body={"top_k": -1, "repetition_penalty": 1.3, "min_tokens": 4})
        with pytest.raises(openai.BadRequestError, match="min_tokens"):
            c.chat.completions.create(model="fake", messages=MSGS, max_tokens=3, extra_body={"min_tokens": 4})
    assert (seen[0].top_k, seen[0].repetition_penalty, seen[0].min_tokens) == (0, 1.3, 4)
