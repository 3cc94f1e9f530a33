"""`lalm serve` on a real (tiny, random) model, driven by the official `openai` client.

Run: .venv/bin/pytest -q tests/test_serve_openai.py
The server runs under uvicorn in a thread on a free port. Shows: models list, chat
(non-streaming, streaming, input_audio), the transcription endpoint, and that 32 concurrent
greedy requests get exactly the tokens they get one at a time and from `LALM.generate`.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("wordfreq")
sf = pytest.importorskip("soundfile")

from lalm.serve.app import ServerConfig, create_app
from lalm.serve.backend import LALMBackend
from lalm.serve.cli import background_server
from lalm.serve.engine import Engine, Options
from lalm.serve.fake import tiny_random_checkpoint

KEY = "sk-lalm-test"


def wav_b64(seconds: float, seed: int, rate: int = 16000) -> str:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * (150 + 400 * rng.random()) * t) + 0.05 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), rate, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import lalm

    folder = tiny_random_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-serve")
    model = lalm.load(folder, dtype="float32")
    engine = Engine(LALMBackend(model, max_batch=32, max_model_len=1024), max_batch=32,
                    max_queue=64)
    with background_server(create_app(engine, ServerConfig(api_key=KEY, default_max_tokens=48))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        yield client, model, engine


def requests(n: int) -> list[dict]:
    """n varied requests: text only, audio only (voice chat), audio + question; several lengths."""
    out = []
    for i in range(n):
        kind = i % 3
        content: list[dict] = []
        if kind > 0:
            content.append({"type": "input_audio",
                            "input_audio": {"data": wav_b64(0.4 + 0.3 * (i % 5), i), "format": "wav"}})
        if kind != 1:
            content.append({"type": "text", "text": f"Question {i}: " + "tell me more " * (i % 4)})
        out.append({"messages": [{"role": "user", "content": content}],
                    "max_tokens": 4 + (i * 5) % 13})
    return out


def test_models_list(server):
    client, _, _ = server
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny-serve"]


def test_chat_non_stream_stream_and_library_agree(server):
    client, model, _ = server
    req = requests(3)[2]  # audio + text
    r = client.chat.completions.create(model="tiny-serve", temperature=0, logprobs=True,
                                       top_logprobs=3, **req)
    choice = r.choices[0]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The same conversation through the library: same text, tokens and log-probs.
    conv = [{"role": "user", "content": [
        {"type": "audio", "audio": base64.b64decode(req["messages"][0]["content"][0]
                                                    ["input_audio"]["data"])},
        {"type": "text", "text": req["messages"][0]["content"][1]["text"]}]}]
    (ref,) = model.generate(conv, max_new_tokens=req["max_tokens"], temperature=0)
    assert choice.message.content == ref.text
    assert r.usage.prompt_tokens == ref.prompt_tokens
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert choice.finish_reason == ref.finish_reason
    lps = choice.logprobs.content
    stop_ids = set(model.defaults.eos_token_ids)
    kept = [lp for t, lp in zip(ref.token_ids, ref.logprobs) if t not in stop_ids]
    assert [e.logprob for e in lps] == pytest.approx(kept, abs=1e-5)
    for e in lps:  # greedy: the chosen token is the best alternative
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)

    stream = client.chat.completions.create(model="tiny-serve", temperature=0, stream=True,
                                            stream_options={"include_usage": True}, **req)
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == ref.text and finish == ref.finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens


def test_transcription_endpoint(server):
    client, model, _ = server
    wav = base64.b64decode(wav_b64(1.2, 99))
    t = client.audio.transcriptions.create(model="tiny-serve", file=("clip.wav", wav, "audio/wav"))
    conv = [{"role": "user", "content": [{"type": "audio", "audio": wav},
                                         {"type": "text", "text": "Transcribe this audio."}]}]
    (ref,) = model.generate(conv, max_new_tokens=48, temperature=0)  # the server's default
    assert t.text == ref.text.strip()
    text = client.audio.transcriptions.create(model="tiny-serve", response_format="text",
                                              file=("clip.wav", wav, "audio/wav"))
    assert text.strip() == ref.text.strip()


def test_openai_client_sees_errors(server):
    client, _, _ = server
    with pytest.raises(openai.BadRequestError, match="not valid base64"):
        client.chat.completions.create(model="tiny-serve", messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_32_concurrent_clients_equal_one_at_a_time(server):
    client, _, engine = server
    reqs = requests(32)

    def ask(req):
        r = client.chat.completions.create(model="tiny-serve", temperature=0, logprobs=True, **req)
        c = r.choices[0]
        tokens = tuple(e.token for e in c.logprobs.content)  # token by token, not just the text
        return c.message.content, tokens, r.usage.completion_tokens, c.finish_reason

    alone = [ask(r) for r in reqs]
    engine.max_rows_seen = 0
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, reqs))
    assert together == alone
    assert engine.max_rows_seen > 1  # they really shared the batch
    assert all(n >= 1 for _, _, n, _ in alone)
    assert len({text for text, _, _, _ in alone}) > 16  # varied answers, not one degenerate string


def test_prompt_beyond_context_is_a_400(server):
    client, _, _ = server
    for words in (700, 6000):  # past the server's 1024-token rows; past the model's 4096 positions
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-serve", messages=[
                {"role": "user", "content": "the people of the world " * (words // 5)}])
        assert e.value.body["code"] == "context_length_exceeded", e.value.body
    assert client.chat.completions.create(model="tiny-serve", max_tokens=2, messages=[
        {"role": "user", "content": "still serving?"}]).choices[0].message.content is not None


def test_transcription_with_a_base_model_raw_prompt(server):
    """--asr-raw-prompt: the base checkpoint's pre-training prompt, language tag filled in."""
    _, model, _ = server
    raw = "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: "
    config = ServerConfig(default_max_tokens=16, asr_raw_prompt=raw + "<|{language}|>")
    engine = Engine(LALMBackend(model, max_batch=4, max_model_len=512, name="base"))
    wav = base64.b64decode(wav_b64(0.8, 5))
    with background_server(create_app(engine, config)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        t = client.audio.transcriptions.create(model="base", language="fr",
                                               file=("a.wav", wav, "audio/wav"))
    (ref,) = model.generate({"prompt": raw + "<|fr|>", "audios": [wav]}, max_new_tokens=16,
                            temperature=0)
    assert t.text == ref.text.strip()


def test_vllm_sampling_extras_decode_as_the_library(server):
    """top_k, repetition_penalty and min_tokens (vLLM's fields, sent in the SDK's extra_body)
    reach the model: each answer equals the library's with the same option."""
    client, model, _ = server
    conv = [{"role": "user", "content": "Question 7: tell me more tell me more"}]

    def lib(**kw):
        return model.generate(conv, max_new_tokens=12, **kw)[0]

    def api(**kw):
        return client.chat.completions.create(model="tiny-serve", messages=conv, max_tokens=12, **kw)

    greedy = lib(temperature=0)
    penalised = lib(temperature=0, repetition_penalty=1.8)
    assert penalised.token_ids != greedy.token_ids  # else the next line would prove nothing
    assert api(temperature=0, extra_body={"repetition_penalty": 1.8}).choices[0].message.content == penalised.text
    # top_k 1 keeps the argmax alone: a hot, seeded sample is then the greedy answer
    assert api(temperature=1.5, seed=3).choices[0].message.content != greedy.text
    assert api(temperature=1.5, seed=3, extra_body={"top_k": 1}).choices[0].message.content == greedy.text
    # min_tokens: the engine's row holds it (its effect on stop tokens is generate's, tested there)
    backend = LALMBackend(model)
    row = backend._row(0, backend.prepare(conv), Options(max_new_tokens=8, min_tokens=5))
    assert row.options.min_new_tokens == 5
