"""Audio front-end: decode any file to 16 kHz mono float32, split long audio, Whisper log-mel.

Decoding uses soundfile (libsndfile >= 1.1: wav, flac, ogg/vorbis/opus, mp3; no ffmpeg),
resampling uses soxr (HQ), channels are downmixed by their mean, and integer PCM is scaled to
[-1, 1) float32 (soundfile does this for files; for arrays int16 / 2**15, int32 / 2**31).
For files this is sample for sample what the Qwen2-Audio README's `librosa.load(path,
sr=16000)` returns (librosa >= 0.10: soundfile float32, mean of channels, then soxr HQ, then
zero-padded to ceil(n * 16000 / rate) samples). The official eval scripts decode with ffmpeg
(`ffmpeg_read`) instead, whose resampler gives slightly different samples and lengths.

`log_mel` equals transformers' `WhisperFeatureExtractor(padding="max_length")` (spec section 1)
but only on the frames the model uses: the `L_mel = ceil(n / 160)` valid frames plus the
`EXTRA_FRAMES` frames past them that the encoder's two convolutions see (conv1 k3 p1, then
conv2 k3 s2 p1: the last valid conv2 output reads mel frames up to L_mel + 1). Those extra
frames are computed from the zero-padded signal exactly as the reference's 30 s-padded
features there, and the `max - 8` floor uses the maximum over valid + computed frames, which
equals the reference's maximum over the whole padded 30 s (pure-zero frames sit at the 1e-10
clamp, below every other value). A 3 s clip therefore costs a tenth of a 30 s one.

Long audio. The reference silently keeps only the first 30 s. lalm never truncates:
`split_windows` cuts audio longer than 30 s into windows of at most 30 s. Each cut is placed at
the quietest 50 ms (lowest smoothed frame energy) inside the last `SEARCH_SECONDS` of the
window, so a window is between 25 s and 30 s long except the last; cuts are on 10 ms frame
boundaries, deterministic (ties go to the latest candidate, keeping windows long), and the last
window is kept at least `MIN_TAIL_SECONDS` long so it always yields audio tokens. Limits: the
cut is energy based, not a VAD, so continuous speech without pauses may still be cut
mid-word; each window is encoded independently (no context across a cut). All windows of one
audio share one `<|audio_bos|> ... <|audio_eos|>` span (see processor.py).
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import torch

from lalm.errors import AudioError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000
# Mel frames past L_mel read by the last valid output of conv1 (k3 p1) + conv2 (k3 s2 p1).
EXTRA_FRAMES = 2
SEARCH_SECONDS = 5.0
MIN_TAIL_SECONDS = 1.0


# ----------------------------------------------------------------------------- loading


def _describe(src: Any) -> str:
    """A short name for `src` in error messages."""
    if isinstance(src, (str, os.PathLike)):
        return f"audio file '{os.fspath(src)}'"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"audio bytes ({len(src)} bytes)"
    if isinstance(src, dict):
        return "audio array"
    if isinstance(src, np.ndarray):
        return "audio array"
    return f"audio stream {getattr(src, 'name', type(src).__name__)!r}"


def _to_float32(array: np.ndarray, name: str) -> np.ndarray:
    """Integer PCM to [-1, 1) float32; floats are cast."""
    if array.dtype.kind in "iu":
        if array.dtype.itemsize > 4:  # np.array([0, 1000, ...]) is int64: no PCM format is
            raise AudioError(f"{name}: {array.dtype} samples are not PCM (scaled by 2**63 they "
                             "would be near-silence): pass float32 in [-1, 1], int16 or int32")
        if array.dtype.kind == "u":  # unsigned PCM (8-bit wav) is offset binary
            bits = array.dtype.itemsize * 8
            return ((array.astype(np.float64) - 2 ** (bits - 1)) / 2 ** (bits - 1)).astype(np.float32)
        return (array.astype(np.float64) / 2 ** (array.dtype.itemsize * 8 - 1)).astype(np.float32)
    if array.dtype.kind == "f":
        return array.astype(np.float32, copy=False)
    raise AudioError(f"{name}: unsupported sample type {array.dtype}")


def _as_array(samples: Any, name: str) -> np.ndarray:
    """A numpy array, tensor (any device, bf16 included: numpy has no bf16) or list -> np.ndarray."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu()
        samples = (samples.float() if samples.is_floating_point() else samples).numpy()
    try:
        return np.asarray(samples)
    except (TypeError, ValueError) as e:  # ragged lists, odd objects
        raise AudioError(f"{name}: samples must be a numeric array ({e})") from None


def _to_mono_16k(array: np.ndarray, rate: int, name: str, channels_last: bool = False) -> np.ndarray:
    """(n,) or 2-D array at `rate` -> (n',) float32 at 16 kHz.

    soundfile returns (frames, channels) (channels_last); for user arrays the channel axis is
    taken to be the shorter one.
    """
    array = _as_array(array, name)
    if array.size == 0:
        raise AudioError(f"{name}: contains no audio samples (empty)")
    if array.ndim == 2:
        if not channels_last and array.shape[0] < array.shape[1]:
            array = array.T
        array = _to_float32(array, name).mean(axis=1, dtype=np.float32)
    elif array.ndim == 1:
        array = _to_float32(array, name)
    else:
        raise AudioError(f"{name}: expected 1-D (samples) or 2-D (samples, channels), got shape {array.shape}")
    if array.size == 0:
        raise AudioError(f"{name}: contains no audio samples (empty)")
    if not np.isfinite(array).all():
        raise AudioError(f"{name}: contains NaN or infinite samples")
    # 16000.0 is a rate (JSON has no int type); True and 22050.5 are not.
    if isinstance(rate, (float, np.floating)) and float(rate).is_integer():
        rate = int(rate)
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise AudioError(f"{name}: invalid sampling rate {rate!r}")
    if rate != SAMPLE_RATE:
        n_in = array.size
        array = soxr.resample(array, int(rate), SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
        if array.size == 0:  # e.g. 1 sample at 48 kHz
            raise AudioError(f"{name}: contains no audio samples at 16 kHz (too short at {rate} Hz)")
        array = _librosa_length(array, n_in, int(rate))
    return np.ascontiguousarray(array)


def _librosa_length(resampled: np.ndarray, n_in: int, rate: int) -> np.ndarray:
    """Zero-pad (or trim) soxr's output to librosa.resample's length, ceil(n * 16000 / rate).

    soxr rounds the output length while librosa (`fix=True`, what the official pipeline's
    `librosa.load(sr=16000)` runs after the very same soxr HQ call) pads it with zeros to the
    ceiling. The sample lost is a mel frame lost (L_mel = ceil(n / 160)) for about 1 length in
    300-500 (44.1 / 48 kHz), and then an audio token lost for a quarter of those: ids and the
    encoder's valid length would differ from transformers fed by librosa. The float formula is
    librosa's own.
    """
    target = int(np.ceil(n_in * (float(SAMPLE_RATE) / rate)))
    if resampled.size < target:
        return np.pad(resampled, (0, target - resampled.size))
    return resampled[:target]


def load_audio(src: Any) -> np.ndarray:
    """Any audio source -> float32 mono 16 kHz waveform (n,).

    src: a path (str / Path), encoded file bytes, a binary file-like object, a dict
    `{"array": samples, "sampling_rate": hz}` (HF datasets style), or a numpy array already at
    16 kHz. Raises AudioError naming the source and the problem.
    """
    name = _describe(src)
    if isinstance(src, dict):
        if "array" not in src or "sampling_rate" not in src:
            raise AudioError(f"{name}: a dict needs 'array' and 'sampling_rate' keys, got {sorted(src)}")
        return _to_mono_16k(src["array"], src["sampling_rate"], name)
    if isinstance(src, np.ndarray):
        return _to_mono_16k(src, SAMPLE_RATE, name)
    if isinstance(src, torch.Tensor):
        return _to_mono_16k(src, SAMPLE_RATE, name)
    if isinstance(src, (str, os.PathLike)):
        if not os.fspath(src):  # Path("") is ".", a directory: say what is really wrong
            raise AudioError("audio file path is empty")
        path = Path(src)
        if not path.exists():
            raise AudioError(f"{name}: file not found")
        if path.is_dir():
            raise AudioError(f"{name}: is a directory, not an audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{name}: file is empty (0 bytes)")
        handle: Any = str(path)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise AudioError(f"{name}: empty")
        handle = io.BytesIO(bytes(src))
    elif hasattr(src, "read"):
        handle = src
    else:
        raise AudioError(f"unsupported audio source of type {type(src).__name__}")
    try:
        # always_2d keeps one code path for mono and multi-channel files
        data, rate = sf.read(handle, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{name}: cannot decode as audio (wav/flac/ogg/mp3): {e}") from None
    return _to_mono_16k(data, rate, name, channels_last=True)


# ----------------------------------------------------------------------------- windows


def split_windows(wave: np.ndarray) -> list[np.ndarray]:
    """Split a 16 kHz waveform into windows of at most 30 s (views, no copy), cutting at low energy.

    Short audio (<= 30 s) is returned as one window. See the module docstring for the rule.
    """
    n = len(wave)
    if n <= N_SAMPLES:
        return [wave]
    search = int(SEARCH_SECONDS * SAMPLE_RATE) // HOP_LENGTH  # candidate frames per cut
    min_tail = int(MIN_TAIL_SECONDS * SAMPLE_RATE)
    smooth = np.ones(5) / 5  # 5 frames of 10 ms = 50 ms
    windows, start = [], 0
    while n - start > N_SAMPLES:
        # candidate cut points: frame boundaries in (end - search, end], end <= n - min_tail
        end = min(start + N_SAMPLES, n - min_tail)
        end -= (end - start) % HOP_LENGTH
        lo = end - search * HOP_LENGTH
        # energy of the 10 ms frames around each candidate boundary (2 frames of context each side)
        seg = wave[lo - 2 * HOP_LENGTH : end + 2 * HOP_LENGTH].astype(np.float64)
        energy = (seg[: len(seg) // HOP_LENGTH * HOP_LENGTH].reshape(-1, HOP_LENGTH) ** 2).sum(1)
        # smoothed[i] averages frames i..i+4, centred on the boundary lo + i * HOP_LENGTH
        smoothed = np.convolve(energy, smooth, mode="valid")[: search + 1]
        # latest minimum: argmin over the reversed array picks the last of equal values
        best = len(smoothed) - 1 - int(np.argmin(smoothed[::-1]))
        cut = lo + best * HOP_LENGTH
        if cut <= start:  # cannot happen with 30 s windows and a 5 s search; keep progress anyway
            cut = start + N_SAMPLES
        windows.append(wave[start:cut])
        start = cut
    windows.append(wave[start:])
    return windows


# ----------------------------------------------------------------------------- features


def num_frames(n_samples: int) -> int:
    """Valid mel frames of a window: L_mel = min(3000, ceil(n / 160)) (the reference's mask sum)."""
    return min(N_FRAMES, -(-int(n_samples) // HOP_LENGTH))


def num_audio_tokens(n_frames: int) -> int:
    """Audio tokens of a window with `n_frames` valid mel frames (spec section 2); 0 when <= 2."""
    if n_frames <= 0:
        return 0
    conv_len = (n_frames - 1) // 2 + 1  # after conv2 (stride 2)
    return max(0, (conv_len - 2) // 2 + 1)  # after AvgPool1d(2, 2)


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    # Slaney mel scale: linear below 1 kHz, logarithmic above
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels[log_region] - 15.0))
    return freq


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int) -> torch.Tensor:
    """(n_mels, 201) Slaney-scale, Slaney-normalised triangular filters over 0-8000 Hz.

    Computed in float64 as transformers' `mel_filter_bank(norm="slaney", mel_scale="slaney")`
    (= librosa's `filters.mel` defaults), cached per n_mels.
    """
    n_bins = 1 + N_FFT // 2
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, n_bins)
    mel_pts = np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([8000.0]))[0], n_mels + 2)
    filter_freqs = _mel_to_hz(mel_pts)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]  # (bins, n_mels + 2)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))  # (bins, n_mels)
    fb *= (2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels]))[None, :]
    return torch.from_numpy(fb.T.astype(np.float32)).contiguous()


@functools.lru_cache(maxsize=1)
def _hann() -> torch.Tensor:
    return torch.hann_window(N_FFT)  # periodic, as the reference


def log_mel(wave: np.ndarray, n_mels: int = 128) -> tuple[torch.Tensor, int]:
    """Whisper log-mel of one window (<= 30 s of 16 kHz audio).

    Returns (features (n_mels, F) float32, L_mel) with L_mel = ceil(len / 160) valid frames and
    F = min(L_mel + EXTRA_FRAMES, 3000); frames L_mel..F-1 equal the reference's features of the
    zero-padded 30 s window there.
    """
    n = len(wave)
    if n == 0:
        raise AudioError("log_mel: empty waveform")
    if n > N_SAMPLES:
        raise AudioError(f"log_mel: {n} samples is longer than one 30 s window; use split_windows() first")
    n_valid = num_frames(n)
    n_out = min(n_valid + EXTRA_FRAMES, N_FRAMES)
    # Frame t of the reference is samples [t*160 - 200, t*160 + 200) of the signal zero-padded to
    # 480000 samples and reflect-padded by 200 at both ends (torch.stft center=True). Build just
    # the span that frames 0..n_out-1 read.
    reach = (n_out - 1) * HOP_LENGTH + N_FFT // 2  # samples of the padded signal needed
    length = min(N_SAMPLES, max(reach, n, N_FFT // 2 + 1))
    x = torch.zeros(length, dtype=torch.float32)
    x[:n] = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    right = max(0, reach - N_SAMPLES)  # only when the frames reach the end of the 30 s window
    x = torch.nn.functional.pad(x[None, None], (N_FFT // 2, right), mode="reflect")[0, 0]
    x = x[: (n_out - 1) * HOP_LENGTH + N_FFT]
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=_hann(), center=False, return_complex=True)
    power = stft.abs() ** 2  # (201, n_out)
    mel = mel_filters(n_mels) @ power  # (n_mels, n_out)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0, n_valid


def features(src: Any, n_mels: int = 128) -> list[tuple[torch.Tensor, int]]:
    """load_audio + split_windows + log_mel: [(mel (n_mels, F), L_mel)] per window of one audio."""
    return [log_mel(w, n_mels) for w in split_windows(load_audio(src))]


__all__ = [
    "CHUNK_SECONDS",
    "EXTRA_FRAMES",
    "HOP_LENGTH",
    "N_FFT",
    "N_FRAMES",
    "N_SAMPLES",
    "SAMPLE_RATE",
    "features",
    "load_audio",
    "log_mel",
    "mel_filters",
    "num_audio_tokens",
    "num_frames",
    "split_windows",
]
