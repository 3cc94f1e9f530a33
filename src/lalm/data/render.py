"""Turn a clip recipe (a JSON-able dict from tasks.py / evalsets.py) into 16 kHz mono audio.

Pure functions of the recipe: the same recipe gives the same samples in any process, so
the builder can render in parallel and stay byte-for-byte deterministic.
"""

from __future__ import annotations

import resource
import struct
from pathlib import Path

import numpy as np

from lalm.data import music, sounds, voices
from lalm.errors import AudioError

SR = 16000


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-9)


def _at_snr(fg: np.ndarray, bg: np.ndarray, snr_db: float) -> np.ndarray:
    """fg + bg scaled so that 20 log10(rms(fg) / rms(bg)) = snr_db; bg tiled/cut to fg."""
    if len(bg) < len(fg):
        bg = np.tile(bg, len(fg) // max(1, len(bg)) + 1)
    bg = bg[: len(fg)]
    scale = _rms(fg) / (_rms(bg) * 10 ** (snr_db / 20))
    return (fg + scale * bg).astype(np.float32)


def _synth(r: dict) -> np.ndarray:
    rng = np.random.default_rng(r.get("seed", 0))
    kind, secs = r["type"], r.get("seconds", 1.0)
    if kind == "tone":
        return sounds.tone(r["freq"], secs)
    if kind == "chirp":
        return sounds.chirp(r["f0"], r["f1"], secs)
    if kind == "dtmf":
        return sounds.dtmf(r["digits"])
    if kind == "clicks":
        return sounds.clicks(r["rate_hz"], secs, rng)
    if kind == "noise":
        return sounds.noise(r.get("colour") or rng.choice(["white", "pink", "brown"]), secs, rng)
    if kind == "silence":
        return sounds.silence(secs, rng)
    raise AudioError(f"unknown synth type {kind!r}")


def render(r: dict) -> np.ndarray:
    """recipe -> float32 (n,) at 16 kHz, peak <= 0.99."""
    kind = r["kind"]
    if kind == "tts":
        v = voices.Voice(r["engine"], r["voice"], r.get("gender"), None, r["rate"], r["pitch"])
        wave = voices.speak(v, r["text"])
    elif kind == "sample":
        wave = sounds.sample(r["path"], r.get("speed", 1.0), r.get("max_seconds", 8.0))
    elif kind in ("file", "raw16"):
        import soundfile as sf
        import soxr

        if kind == "raw16":  # headerless 16 kHz signed 16-bit little-endian
            wave = np.fromfile(r["path"], dtype="<i2").astype(np.float32) / 32768.0
        else:
            wave, sr = sf.read(r["path"], dtype="float32", always_2d=True)
            wave = wave.mean(axis=1)
            if sr != SR:
                wave = soxr.resample(wave, sr, SR, quality="HQ").astype(np.float32)
        wave = wave[: int(r.get("max_seconds", 30.0) * SR)]
    elif kind == "synth":
        wave = _synth(r)
    elif kind == "melody":
        rng = np.random.default_rng(r["seed"])
        wave = music.melody(r["key"], r["mode"], r["bpm"], r["timbre"], r["seconds"], rng,
                            bass=r.get("bass", True))
    elif kind == "mix":
        wave = _at_snr(render(r["fg"]), render(r["bg"]), r["snr_db"])
    elif kind == "concat":
        gap = np.zeros(int(r.get("gap_s", 0.3) * SR), np.float32)
        pieces = []
        for p in r["parts"]:
            pieces += [render(p), gap]
        wave = np.concatenate(pieces[:-1])
    else:
        raise AudioError(f"unknown recipe kind {kind!r}")
    wave = np.asarray(wave, np.float32)
    if "noise" in r:  # augmentation: coloured noise at a known SNR
        n = r["noise"]
        bg = sounds.noise(n["colour"], len(wave) / SR + 0.01, np.random.default_rng(n["seed"]))
        wave = _at_snr(wave, bg, n["snr_db"])
    wave = wave * np.float32(10 ** (r.get("gain_db", 0.0) / 20))
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    if peak > 0.99:
        wave = wave * np.float32(0.99 / peak)
    if wave.size < SR // 10:  # very short clips confuse the encoder's padding: 0.1 s minimum
        wave = np.pad(wave, (0, SR // 10 - wave.size))
    return wave.astype(np.float32)


def wav_bytes(wave: np.ndarray) -> bytes:
    """16 kHz mono PCM_16 WAV: a plain 44-byte header, no tags, so equal samples give equal bytes.

    Written by hand because libsndfile fsyncs every file on close, which costs more than
    synthesising the clip when the disk is busy.
    """
    pcm = np.clip(np.round(wave * 32767.0), -32768, 32767).astype("<i2").tobytes()
    header = b"".join((b"RIFF", struct.pack("<I", 36 + len(pcm)), b"WAVEfmt ",
                       struct.pack("<IHHIIHH", 16, 1, 1, SR, SR * 2, 2, 16),
                       b"data", struct.pack("<I", len(pcm))))
    return header + pcm


def render_to_file(job: tuple[str, dict]) -> tuple[str, int]:
    """(output path, recipe) -> (path, samples written)."""
    path, recipe = job
    wave = render(recipe)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(wav_bytes(wave))
    return path, int(wave.size)


def render_chunk(jobs: list[tuple[str, dict]]) -> tuple[list[tuple[str, int]], float]:
    """Render a fixed chunk of jobs in order -> ([(path, samples)], CPU seconds incl. flite).

    libespeak-ng keeps state from one utterance to the next, so the builder gives every chunk
    a fresh process: same chunks, same bytes.
    """
    def cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    t0 = cpu()
    done = [render_to_file(j) for j in jobs]
    return done, cpu() - t0
