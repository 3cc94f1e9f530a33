"""Processor: exact Batch tensors from collate, prepare() on short/long audio, and errors raised before any
work is wasted. (The Batch against transformers' Qwen2AudioProcessor is in test_chat.py, which holds the
real-tokenizer fixtures.)

Run: .venv/bin/pytest -q tests/test_processor.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lalm import audio as A
from lalm.errors import AudioError, ChatFormatError, ContextLengthError
from lalm.processor import Batch, Example, collate, prepare, prepare_raw
from lalm.tokenizer import train_bpe

SR = 16000


def noise(seconds: float, seed: int = 0) -> dict:
    wave = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))
    return {"array": wave.astype(np.float32), "sampling_rate": SR}


@pytest.fixture(scope="module")
def small_tok():
    corpus = ["what is said in this audio", "a dog barks twice", "hello world"] * 10
    return train_bpe(corpus, vocab_size=320)


def test_collate_exact():
    m = [torch.arange(6.0).reshape(2, 3), torch.arange(8.0).reshape(2, 4) + 10, torch.tensor([[1.0, 2], [3, 4]])]
    examples = [
        Example(torch.tensor([5, 6, 7]), torch.tensor([False, True, True]), [m[0]], [2], 0),
        Example(torch.tensor([8, 9]), torch.tensor([False, False]), [], [], 0),
        Example(torch.tensor([1, 2, 3, 4]), torch.tensor([False, False, True, False]), [m[1], m[2]], [3, 1], 0),
    ]
    b = collate(examples, pad_id=0)
    assert b.input_ids.tolist() == [[0, 5, 6, 7], [0, 0, 8, 9], [1, 2, 3, 4]]
    assert b.attention_mask.tolist() == [[False, True, True, True], [False, False, True, True], [True] * 4]
    assert b.position_ids.tolist() == [[0, 0, 1, 2], [0, 0, 0, 1], [0, 1, 2, 3]]
    assert b.labels.tolist() == [[-100, 6, 7, -100], [-100] * 4, [-100, 3, -100, -100]]
    assert b.input_ids.dtype == b.position_ids.dtype == b.labels.dtype == torch.long
    assert b.attention_mask.dtype == torch.bool
    assert b.mel.shape == (3, 2, 4) and b.mel.dtype == torch.float32
    assert b.mel[0].tolist() == [[0, 1, 2, 0], [3, 4, 5, 0]]
    assert b.mel[1].tolist() == [[10, 11, 12, 13], [14, 15, 16, 17]]
    assert b.mel[2].tolist() == [[1, 2, 0, 0], [3, 4, 0, 0]]
    assert b.mel_frames.tolist() == [2, 3, 1] and b.mel_frames.dtype == torch.long
    # inference batch: no targets, no audio
    plain = collate(examples[1:2], pad_id=0)
    assert plain.labels is None and plain.mel is None and plain.mel_frames is None
    assert isinstance(plain.to("cpu"), Batch)


def test_prepare_short_and_long_audio(small_tok):
    conv = [
        {"role": "user", "content": [{"type": "audio", "audio": noise(1.0, 1)}, {"type": "text", "text": "what?"},
                                     {"type": "audio", "audio": noise(47.0, 2)}]},
        {"role": "assistant", "content": "a dog barks"},
    ]
    ex = prepare(conv, small_tok, n_mels=80, add_generation_prompt=False)
    # the 47 s audio is two windows, never truncated; both inside one bos/eos span
    long_windows = A.split_windows(A.load_audio(noise(47.0, 2)))
    assert len(long_windows) == 2 and len(ex.mels) == 3
    assert ex.frames == [100] + [A.num_frames(len(w)) for w in long_windows]
    per_audio = [25, sum(A.num_audio_tokens(f) for f in ex.frames[1:])]
    assert per_audio[1] > 750 and ex.audio_tokens == sum(per_audio)
    ids = ex.ids.tolist()
    assert ids.count(small_tok.audio_id) == ex.audio_tokens
    assert ids.count(small_tok.audio_bos_id) == ids.count(small_tok.audio_eos_id) == 2
    first = ids.index(small_tok.audio_bos_id)
    assert ids[first + 1 : first + 26] == [small_tok.audio_id] * 25 and ids[first + 26] == small_tok.audio_eos_id
    second = ids.index(small_tok.audio_bos_id, first + 1)
    assert ids[second + 1 + per_audio[1]] == small_tok.audio_eos_id
    for mel, window in zip(ex.mels[1:], long_windows):
        assert torch.equal(mel, A.log_mel(window, 80)[0])
    # targets: the answer and its <|im_end|>
    targets = ex.ids[ex.loss_mask].tolist()
    assert small_tok.decode(targets, skip_special_tokens=False) == "a dog barks<|im_end|>"
    batch = collate([ex, prepare(conv[:1], small_tok, n_mels=80)], pad_id=small_tok.pad_id)
    assert batch.mel.shape == (6, 80, max(m.shape[1] for m in ex.mels)) and batch.mel_frames.tolist() == ex.frames * 2
    assert int((batch.input_ids == small_tok.audio_id).sum()) == 2 * ex.audio_tokens
    assert batch.labels is not None and int((batch.labels != -100).sum()) == int(ex.loss_mask.sum())


def test_errors(small_tok, tmp_path):
    missing = str(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="missing.wav.*not found"):
        prepare([{"role": "user", "content": [{"type": "audio", "audio": missing}]}], small_tok, 80)
    # placeholder/audio mismatch is reported before any audio is read (the path does not exist)
    with pytest.raises(ChatFormatError, match="1 <\\|AUDIO\\|> placeholders but 2 audios"):
        prepare_raw("<|AUDIO|>Transcribe:", [missing, missing], small_tok, 80)
    with pytest.raises(ChatFormatError, match="0 <\\|AUDIO\\|> placeholders but 1 audios"):
        prepare_raw("Transcribe:", [missing], small_tok, 80)
    with pytest.raises(AudioError, match="audio 1 is too short"):
        prepare([{"role": "user", "content": [{"type": "audio", "audio": noise(0.01)}]}], small_tok, 80)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": noise(2.0)}, {"type": "text", "text": "hi"}]}]
    n = len(prepare(conv, small_tok, 80))
    assert len(prepare(conv, small_tok, 80, max_length=n)) == n
    with pytest.raises(ContextLengthError, match=f"{n} tokens \\(50 of them audio\\).*limit is {n - 1}"):
        prepare(conv, small_tok, 80, max_length=n - 1)


def test_prepare_raw(small_tok):
    ex = prepare_raw("<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>",
                     [noise(1.0)], small_tok, 80, target="hello world")
    assert ex.audio_tokens == 25 and ex.ids[:27].tolist() == [small_tok.audio_bos_id] + [small_tok.audio_id] * 25 \
        + [small_tok.audio_eos_id]
    assert small_tok.decode(ex.ids[ex.loss_mask].tolist(), skip_special_tokens=False) == "hello world<|endoftext|>"
