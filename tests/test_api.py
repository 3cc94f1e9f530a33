"""The public API: lalm.load (folders, hub names), LALM.logits against transformers, raw
base-model prompts, generation defaults, and typed errors for bad input.

Run: .venv/bin/pytest -x -q tests/test_api.py
"""

from __future__ import annotations

import json
import shutil

import pytest
import soundfile as sf
import torch

pytest.importorskip("transformers")
from hf_reference import left_pad, special_ids, waveform, whisper_features
from test_generate import CONVERSATIONS, VOCAB, waves_of

import lalm
from lalm.errors import AudioError, ChatFormatError, ConfigError, ContextLengthError


def test_logits_equal_transformers_batched(tiny, hf):
    convs = [CONVERSATIONS[k] for k in ("two_audios", "text_only", "multi_turn")]
    ours = tiny.logits(convs)
    ids = [tiny.prepare(c).ids.tolist() for c in convs]
    input_ids, mask, _ = left_pad(ids, special_ids(VOCAB)["pad"])
    f, fm = whisper_features([w for c in convs for w in waves_of(c)], 128)
    with torch.inference_mode():
        ref = hf(input_ids=input_ids, attention_mask=mask.long(), input_features=f, feature_attention_mask=fm).logits
    for o, r, n in zip(ours, ref, map(len, ids)):
        assert o.shape == (n, VOCAB) and o.dtype == torch.float32
        torch.testing.assert_close(o, r[-n:], atol=1e-4, rtol=0)


def test_one_conversation_or_a_list(tiny):
    conv = CONVERSATIONS["text_only"]
    (a,) = tiny.logits(conv)
    (b,) = tiny.logits([conv])
    assert torch.equal(a, b)
    (r,) = tiny.generate(conv, max_new_tokens=3)
    assert len(tiny.generate([conv, conv], max_new_tokens=3)) == 2 and r.prompt_tokens == a.shape[0]


def test_raw_base_model_prompt_matches_transformers(tiny, hf):
    """A base-model prompt (no chat markup): the official caption prompt form."""
    wave = waveform(2.5, 11)
    raw = {"prompt": "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:",
           "audios": [{"array": wave, "sampling_rate": 16000}]}
    ex = tiny.prepare(raw)
    s = special_ids(VOCAB)
    assert s["im_start"] not in ex.ids.tolist() and ex.ids[0] == s["audio_bos"]
    (r,) = tiny.generate(raw, max_new_tokens=16, min_new_tokens=16, temperature=0)
    f, fm = whisper_features([wave], 128)
    ref = hf.generate(input_ids=ex.ids[None], attention_mask=torch.ones(1, len(ex.ids), dtype=torch.long),
                      input_features=f, feature_attention_mask=fm, do_sample=False, max_new_tokens=16,
                      min_new_tokens=16, eos_token_id=[s["pad"], s["im_end"]], pad_token_id=s["pad"],
                      suppress_tokens=[s["audio"]])
    assert r.token_ids == ref[0, len(ex.ids):].tolist()
    assert r.audio_tokens == int((ex.ids == s["audio"]).sum())


def test_generation_config_sets_the_defaults(tiny, tmp_path):
    s = special_ids(VOCAB)
    assert tiny.defaults.eos_token_ids[:2] == (s["pad"], s["im_end"])
    greedy = tiny.options()
    assert greedy.greedy and greedy.stop_token_ids == tiny.defaults.eos_token_ids
    folder = tmp_path / "sampling"
    shutil.copytree(tiny.path, folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "eos_token_id": [s["pad"], s["im_end"]], "repetition_penalty": 1.1,
         "temperature": 0.7, "top_k": 20, "top_p": 0.5}))
    o = lalm.load(folder).options()
    assert (o.temperature, o.top_k, o.top_p, o.repetition_penalty) == (0.7, 20, 0.5, 1.1)
    assert lalm.load(folder).options(temperature=0).greedy
    (folder / "generation_config.json").unlink()  # no file: greedy, stop at <|im_end|> and <|endoftext|>
    o = lalm.load(folder).options()
    assert o.greedy and set(o.stop_token_ids) == {s["pad"], s["im_end"]}


def test_hub_name_resolves_through_the_local_cache(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--Qwen--Qwen2-Audio-7B-Instruct"
    shutil.copytree(tiny.path, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    m = lalm.load("Qwen/Qwen2-Audio-7B-Instruct")
    assert m.path == repo / "snapshots" / "0123abc"
    assert lalm.load("Qwen/Qwen2-Audio-7B-Instruct@0123abc").path == m.path
    with pytest.raises(ConfigError, match="Hugging Face cache.*does not download"):
        lalm.load("Qwen/Qwen2-Audio-7B")
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        lalm.load(str(tmp_path / "nowhere" / "model"))


@pytest.fixture
def files(tmp_path):
    sf.write(tmp_path / "ok.wav", waveform(1.0, 3), 16000)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not audio at all")
    sf.write(tmp_path / "silence0.wav", waveform(0.0001, 1)[:0].reshape(0), 16000)  # a valid file, 0 samples
    return tmp_path


@pytest.mark.parametrize("case, error, words", [
    ("missing", AudioError, "not found"),
    ("unsupported", AudioError, "cannot decode"),
    ("empty_file", AudioError, "empty"),
    ("no_samples", AudioError, "empty|too short|no audio"),
    ("system_audio", ChatFormatError, "only allowed in user"),
])
def test_bad_input_raises_typed_errors(tiny, files, case, error, words):
    audio = {"missing": files / "nope.wav", "unsupported": files / "notes.txt", "empty_file": files / "empty.wav",
             "no_samples": files / "silence0.wav", "system_audio": files / "ok.wav"}[case]
    role = "system" if case == "system_audio" else "user"
    conv = [{"role": role, "content": [{"type": "audio", "audio": str(audio)}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(error, match=words):
        tiny.generate(conv, max_new_tokens=2)


def test_prompt_longer_than_context(tiny):
    n = tiny.config.text.max_position_embeddings
    with pytest.raises(ContextLengthError):
        tiny.logits([{"role": "user", "content": " the" * (n + 1)}])
    with pytest.raises(ContextLengthError):
        list(tiny.stream([{"role": "user", "content": " the" * (n + 1)}]))


def test_a_bare_message_is_refused_not_read_as_raw_prompts(tiny):
    """A message dict passed without its list used to be iterated: its keys "role" and "content"
    became two raw base-model prompts and two answers came back."""
    message = {"role": "user", "content": "hi"}
    with pytest.raises(ChatFormatError, match="must be a list of messages, got dict"):
        tiny.generate(message, max_new_tokens=2)
    with pytest.raises(ChatFormatError, match="must be a list of messages, got dict"):
        tiny.logits(message)
    with pytest.raises(ChatFormatError, match="must be a list of messages, got dict"):
        tiny.generate([message, [message]], max_new_tokens=2)  # a list of conversations: each one checked
