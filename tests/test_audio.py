"""Audio front-end against transformers' WhisperFeatureExtractor, plus decoding, resampling, errors, windows.

Run: .venv/bin/pytest -q tests/test_audio.py
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from lalm import audio as A
from lalm.errors import AudioError

SR = A.SAMPLE_RATE


def speechy(seconds: float, seed: int = 0, rate: int = SR) -> np.ndarray:
    """Tone + noise with a syllable-like envelope and exact-zero gaps, so the max-8 floor is active."""
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    t = np.arange(n) / rate
    env = np.clip(np.sin(2 * np.pi * 1.7 * t), 0, None) ** 2
    x = env * (0.4 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(n))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def extractor():
    transformers = pytest.importorskip("transformers")
    cache = {}

    def get(n_mels):
        if n_mels not in cache:
            cache[n_mels] = transformers.WhisperFeatureExtractor(feature_size=n_mels)
        return cache[n_mels]

    return get


def reference(extractor, wave, n_mels):
    out = extractor(n_mels)(wave, sampling_rate=SR, padding="max_length", return_attention_mask=True,
                            return_tensors="np")
    return out["input_features"][0], int(out["attention_mask"][0].sum())


@pytest.mark.parametrize("n_mels", [128, 80])
@pytest.mark.parametrize("seconds", [0.05, 1.0, 3.3, 29.99, 30.0, 47.0])
def test_log_mel_matches_whisper_feature_extractor(extractor, n_mels, seconds):
    wave = speechy(seconds, seed=int(seconds * 100))
    ref, ref_frames = reference(extractor, wave, n_mels)  # (n_mels, 3000); the reference keeps the first 30 s
    # lalm never truncates: audio over 30 s is split; its first window when cut at exactly 30 s is
    # what the reference sees
    mel, n_frames = A.log_mel(wave[: A.N_SAMPLES], n_mels)
    assert n_frames == ref_frames == A.num_frames(min(len(wave), A.N_SAMPLES))
    F = mel.shape[1]
    assert mel.shape == (n_mels, min(n_frames + A.EXTRA_FRAMES, A.N_FRAMES))
    assert F >= n_frames
    assert np.abs(mel.numpy() - ref[:, :F]).max() <= 1e-4
    # the frames past F are the reference's floor value, never read by the encoder's valid outputs
    if F < A.N_FRAMES:
        floor = ref[:, F:]
        assert np.allclose(floor, floor.flat[0]) and floor.flat[0] == ref.min()
    # audio tokens: transformers' processor formula on the mask sum
    assert A.num_audio_tokens(n_frames) == (((ref_frames - 1) // 2 + 1) - 2) // 2 + 1


def test_log_mel_over_30s_is_refused_not_truncated():
    with pytest.raises(AudioError, match="split_windows"):
        A.log_mel(speechy(47.0), 128)
    windows = A.split_windows(speechy(47.0))
    assert len(windows) == 2 and all(len(w) <= A.N_SAMPLES for w in windows)
    assert sum(len(w) for w in windows) == int(47.0 * SR)


def test_silence_gives_the_floor(extractor):
    wave = np.zeros(SR, dtype=np.float32)
    mel, n = A.log_mel(wave, 80)
    ref, _ = reference(extractor, wave, 80)
    assert n == 100 and np.abs(mel.numpy() - ref[:, : mel.shape[1]]).max() == 0


def test_frame_and_token_counts():
    assert A.num_frames(1) == 1 and A.num_frames(160) == 1 and A.num_frames(161) == 2
    assert A.num_frames(A.N_SAMPLES) == 3000 and A.num_frames(10 * A.N_SAMPLES) == 3000
    assert [A.num_audio_tokens(f) for f in range(8)] == [0, 0, 0, 1, 1, 1, 1, 2]
    assert A.num_audio_tokens(3000) == 750
    # spec: glass-breaking-151256.mp3 gives 101 tokens: L_mel 403..406 -> 101
    assert [A.num_audio_tokens(f) for f in (402, 403, 406, 407)] == [100, 101, 101, 102]
    assert A.num_audio_tokens(A.num_frames(4 * SR + 800)) == 101  # a 4.05 s clip
    # the processor's formula for every frame count
    for f in range(1, 3001):
        assert A.num_audio_tokens(f) == (((f - 1) // 2 + 1) - 2) // 2 + 1


def test_mel_filters_match_transformers():
    audio_utils = pytest.importorskip("transformers.audio_utils")
    for n_mels in (80, 128):
        ref = audio_utils.mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                                          max_frequency=8000.0, sampling_rate=SR, norm="slaney",
                                          mel_scale="slaney")
        assert np.abs(A.mel_filters(n_mels).numpy() - ref.T).max() < 1e-7


# ----------------------------------------------------------------------------- decoding


def tone(rate: int, seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("WAV", "PCM_32"), ("WAV", "FLOAT"),
                                         ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_formats(tmp_path, fmt, subtype):
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, tone(SR), SR, format=fmt, subtype=subtype)
    wave = A.load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    ref = tone(SR)
    if fmt in ("WAV", "FLAC"):  # lossless: exact up to quantisation
        assert len(wave) == len(ref)
        assert np.abs(wave - ref).max() <= (1e-4 if subtype == "PCM_16" else 1e-6)
    else:  # lossy codecs add delay/padding; the content must still be the tone
        assert abs(len(wave) - len(ref)) < 0.1 * SR
        spectrum = np.abs(np.fft.rfft(wave[2000:14000]))
        assert abs(np.argmax(spectrum) * SR / 12000 - 440) < 3
    # bytes and file-like give the same as the path
    data = path.read_bytes()
    assert np.array_equal(A.load_audio(data), wave)
    assert np.array_equal(A.load_audio(io.BytesIO(data)), wave)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_to_16k(tmp_path, rate):
    path = tmp_path / "clip.wav"
    sf.write(path, tone(rate, 2.0), rate, subtype="FLOAT")
    wave = A.load_audio(path)
    assert len(wave) == 2 * SR
    # away from the edges the resampled tone equals the tone sampled at 16 kHz
    assert np.abs(wave[800:-800] - tone(SR, 2.0)[800:-800]).max() < 2e-3
    from_dict = A.load_audio({"array": tone(rate, 2.0).astype(np.float64), "sampling_rate": rate})
    assert np.allclose(from_dict, wave, atol=1e-6)


def test_stereo_and_integer_pcm(tmp_path):
    left, right = tone(SR), -0.5 * tone(SR)
    stereo = np.stack([left, right], axis=1)  # (n, 2)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, SR, subtype="FLOAT")
    assert np.allclose(A.load_audio(path), 0.25 * tone(SR), atol=1e-7)
    # arrays: int16 / int32 PCM scaled to [-1, 1); channel axis may come first
    pcm16 = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    assert np.allclose(A.load_audio(pcm16), [0, 0.5, -1, 32767 / 32768])
    pcm32 = (pcm16.astype(np.int32) << 16)
    assert np.allclose(A.load_audio(pcm32), [0, 0.5, -1, 32767 / 32768])
    wide = np.stack([pcm16, pcm16 // 2])  # (2, n)
    assert np.allclose(A.load_audio(wide), [0, 0.375, -0.75, (32767 + 16383) / 65536])
    path16 = tmp_path / "int.wav"
    sf.write(path16, pcm16, SR, subtype="PCM_16")
    assert np.allclose(A.load_audio(path16), [0, 0.5, -1, 32767 / 32768])


def test_errors_name_the_file_and_problem(tmp_path):
    with pytest.raises(AudioError, match=r"missing\.wav.*not found"):
        A.load_audio(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav.*empty"):
        A.load_audio(empty)
    text = tmp_path / "notes.mp3"
    text.write_text("this is not audio\n" * 50)
    with pytest.raises(AudioError, match=r"notes\.mp3.*cannot decode"):
        A.load_audio(text)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 12)  # truncated header
    with pytest.raises(AudioError, match=r"broken\.wav.*cannot decode"):
        A.load_audio(broken)
    with pytest.raises(AudioError, match="is a directory"):
        A.load_audio(tmp_path)
    with pytest.raises(AudioError, match=r"audio bytes.*cannot decode"):
        A.load_audio(b"\x00\x01garbage" * 64)
    with pytest.raises(AudioError, match="empty"):
        A.load_audio(b"")
    zero_frames = tmp_path / "zero.wav"
    sf.write(zero_frames, np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(AudioError, match=r"zero\.wav.*no audio samples"):
        A.load_audio(zero_frames)
    with pytest.raises(AudioError, match="NaN"):
        A.load_audio(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(AudioError, match="'array' and 'sampling_rate'"):
        A.load_audio({"array": np.zeros(10)})


# ----------------------------------------------------------------------------- long audio


def test_75s_split_at_quiet_points():
    rng = np.random.default_rng(1)
    wave = (0.3 * rng.standard_normal(75 * SR)).astype(np.float32)
    wave[int(27.0 * SR) : int(27.3 * SR)] = 0  # pauses the cuts should find
    wave[int(54.5 * SR) : int(54.8 * SR)] = 0
    windows = A.split_windows(wave)
    cuts = np.cumsum([len(w) for w in windows])[:-1] / SR
    assert len(windows) == 3
    assert 27.0 <= cuts[0] <= 27.3 and 54.5 <= cuts[1] <= 54.8
    assert np.array_equal(np.concatenate(windows), wave)
    # deterministic
    assert [len(w) for w in A.split_windows(wave)] == [len(w) for w in windows]


def test_75s_without_pauses_gives_near_30s_windows():
    rng = np.random.default_rng(2)
    wave = (0.3 * rng.standard_normal(75 * SR)).astype(np.float32)
    windows = A.split_windows(wave)
    lengths = [len(w) / SR for w in windows]
    assert len(windows) == 3 and all(25 <= s <= 30 for s in lengths[:2]) and lengths[2] >= 15
    tokens = [A.num_audio_tokens(A.num_frames(len(w))) for w in windows]
    assert all(t <= 750 for t in tokens)
    # ~25 tokens per second, losing at most one token per window to rounding
    assert 75 * 25 - 3 <= sum(tokens) <= 75 * 25


def test_ten_minutes_in_bounded_windows():
    wave = speechy(600.0, seed=3)
    windows = A.split_windows(wave)
    assert 20 <= len(windows) <= 24
    assert all(len(w) <= A.N_SAMPLES for w in windows) and len(windows[-1]) >= A.MIN_TAIL_SECONDS * SR
    assert all(np.shares_memory(w, wave) for w in windows)  # views: no copy of the 10 minutes
    mel, frames = A.log_mel(windows[5], 128)
    assert frames == A.num_frames(len(windows[5])) and mel.shape[1] <= A.N_FRAMES


def test_short_tail_is_avoided():
    wave = speechy(30.01, seed=4)  # 160 samples over 30 s
    windows = A.split_windows(wave)
    assert len(windows) == 2 and len(windows[1]) >= A.MIN_TAIL_SECONDS * SR


def test_tensors_ragged_arrays_and_one_sample_files(tmp_path):
    """Each input either loads or raises an AudioError that names it (never a TypeError, never an
    anonymous error later in log_mel)."""
    torch = pytest.importorskip("torch")
    wave = tone(SR, 0.1)
    half = torch.from_numpy(wave).to(torch.bfloat16)  # e.g. a model's bf16 output
    expected = half.float().numpy()
    assert np.array_equal(A.load_audio(half), expected)
    assert np.array_equal(A.load_audio({"array": half, "sampling_rate": SR}), expected)
    with pytest.raises(AudioError, match="audio array.*numeric"):
        A.load_audio({"array": [[0.0, 0.1], [0.2]], "sampling_rate": SR})  # ragged
    one = tmp_path / "one.wav"  # 1 sample at 48 kHz is 0 samples at 16 kHz
    sf.write(one, np.full(1, 0.1, np.float32), 48000)
    with pytest.raises(AudioError, match=r"one\.wav.*no audio samples"):
        A.features(one)
    with pytest.raises(AudioError, match="path is empty"):
        A.load_audio("")


def test_int64_samples_are_refused_and_integral_float_rates_accepted():
    """np.array of Python ints is int64: scaled as PCM it would be silently near-silence."""
    with pytest.raises(AudioError, match="int64 samples are not PCM"):
        A.load_audio(np.array([0, 1000, -1000] * 400))
    wave = tone(SR, 0.1)
    assert np.array_equal(A.load_audio({"array": wave, "sampling_rate": 16000.0}),
                          A.load_audio({"array": wave, "sampling_rate": 16000}))
    for bad in (True, 22050.5, 0):
        with pytest.raises(AudioError, match="invalid sampling rate"):
            A.load_audio({"array": wave, "sampling_rate": bad})
