"""Front-end audit: regressions for defects found in audio.py / tokenizer.py (each test failed before its fix).

Run: .venv/bin/pytest -q tests/test_frontend_audit.py
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from lalm import audio as A
from lalm.errors import AudioError
from lalm.processor import audio_windows
from lalm.tokenizer import train_bpe

SR = A.SAMPLE_RATE


def librosa_load(data: bytes, sr: int = SR) -> np.ndarray:
    """librosa.load(BytesIO(data), sr=16000) as librosa 0.10 does it (librosa is not a dependency):
    soundfile float32 -> mean over channels -> soxr 'soxr_hq' -> util.fix_length to ceil(n * ratio)."""
    y, native = sf.read(io.BytesIO(data), dtype=np.float32, always_2d=False)
    y = y.T
    if y.ndim > 1:
        y = np.mean(y, axis=tuple(range(y.ndim - 1)))
    if native == sr:
        return y
    n = int(np.ceil(y.shape[-1] * (float(sr) / native)))
    y_hat = soxr.resample(y, native, sr, quality="soxr_hq")
    return np.pad(y_hat, (0, max(0, n - len(y_hat))))[:n].astype(y.dtype)


def wav_bytes(x: np.ndarray, rate: int, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("rate,n", [(22050, 22057), (44100, 44101), (48000, 48007)])
@pytest.mark.parametrize("channels,subtype", [(1, "PCM_U8"), (2, "PCM_24"), (6, "FLOAT")])
def test_resampled_files_equal_librosa_load_sample_for_sample(rate, n, channels, subtype):
    # lengths where soxr rounds the output length down and librosa pads it to the ceiling
    x = (0.3 * np.random.default_rng(rate + channels).standard_normal((n, channels))).clip(-1, 1)
    data = wav_bytes(x, rate, subtype)
    ref = librosa_load(data)
    got = A.load_audio(data)
    assert got.dtype == np.float32 and len(got) == len(ref) == -(-n * SR // rate)
    assert np.array_equal(got, ref)
    # the HF-datasets dict form resamples the same way
    mono = x.mean(axis=1).astype(np.float32)
    assert len(A.load_audio({"array": mono, "sampling_rate": rate})) == len(ref)


def test_resampled_length_gives_the_reference_audio_token_count():
    """48961 samples at 48 kHz: librosa.load gives 16321 samples (L_mel 103, 26 tokens); soxr alone
    gives 16320 (L_mel 102, 25 tokens), one <|AUDIO|> fewer than transformers' Qwen2AudioProcessor."""
    n = 48961
    t = np.arange(n) / 48000
    data = wav_bytes((0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 48000, "FLOAT")
    ref = librosa_load(data)
    assert len(ref) == 16321
    mels, frames, tokens = audio_windows(data, 128)
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor(feature_size=128)
    out = fe(ref, sampling_rate=SR, padding="max_length", return_attention_mask=True, return_tensors="np")
    ref_frames = int(out["attention_mask"][0].sum())
    assert frames == [ref_frames] == [103]
    assert tokens == (((ref_frames - 1) // 2 + 1) - 2) // 2 + 1 == 26
    assert np.abs(mels[0].numpy() - out["input_features"][0][:, : mels[0].shape[1]]).max() <= 1e-4


def test_too_short_after_resampling_is_still_refused():
    # soxr gives nothing for 1 sample at 48 kHz; padding must not turn that into a 1-sample clip
    with pytest.raises(AudioError, match="no audio samples at 16 kHz"):
        A.load_audio({"array": np.full(1, 0.1, np.float32), "sampling_rate": 48000})


@pytest.fixture(scope="module")
def tiny_tok():
    return train_bpe(["hello world, a dog barks", "naïve café 你好"] * 10, vocab_size=320)


def test_stream_decoder_skips_specials_given_as_tensors(tiny_tok):
    ids = tiny_tok.encode("hello world<|im_end|><|endoftext|>")
    expected = tiny_tok.decode(ids)
    assert expected == "hello world"
    # generation loops often hold ids as tensors: a 0-d tensor hashes by identity, not value
    sd = tiny_tok.stream_decoder()
    assert "".join(sd.push(t) for t in torch.tensor(ids)) + sd.flush() == expected
    sd = tiny_tok.stream_decoder()
    assert "".join(sd.push(t) for t in np.array(ids)) + sd.flush() == expected


def test_stream_decoder_drops_ids_past_the_tokenizer_like_decode(tiny_tok):
    # the 7B embedding has 156032 rows for 151649 tokenizer ids: the model can emit an id that
    # decode() silently drops; streaming must give the same text, not raise mid-generation
    ids = tiny_tok.encode("hello") + [tiny_tok.vocab_size + 3] + tiny_tok.encode(" world")
    sd = tiny_tok.stream_decoder()
    assert "".join(sd.push(i) for i in ids) + sd.flush() == tiny_tok.decode(ids) == "hello world"
    with pytest.raises(ValueError, match="outside the vocabulary"):  # direct lookups still say so
        tiny_tok.token_bytes(tiny_tok.vocab_size + 3)
