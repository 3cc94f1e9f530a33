"""Non-speech audio: sonic-pi samples and synthesised sound events (tones, chirps, DTMF,
clicks, coloured noise, silence). All float32 mono 16 kHz, deterministic for a seed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import soxr

SR = 16000
SONIC_PI_DIR = Path("/usr/share/sonic-pi/samples")
# Whole prefixes kept for evaluation only (coarse type on unseen kinds of sound).
HELD_OUT_PREFIXES = ("vinyl", "glitch", "misc")
# sonic-pi prefix -> the one-word answer to "What sound is this?"
PREFIX_LABEL = {"ambi": "ambient", "bass": "bass", "bd": "kick", "drum": "drum",
                "elec": "electronic", "guit": "guitar", "loop": "loop", "perc": "percussion",
                "sn": "snare", "tabla": "tabla", "mehackit": "robot",
                "vinyl": "vinyl", "glitch": "glitch", "misc": "noise"}
# prefix -> coarse type; prefixes left out are ambiguous (a bass note, an ambient pad)
PREFIX_COARSE = {"bd": "sound", "drum": "sound", "elec": "sound", "perc": "sound",
                 "sn": "sound", "tabla": "sound", "mehackit": "sound", "loop": "music",
                 "guit": "music", "vinyl": "sound", "glitch": "sound", "misc": "sound"}
SYNTH_LABELS = ("tone", "chirp", "dtmf", "clicks", "noise", "silence")
DTMF = {"1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "4": (770, 1209),
        "5": (770, 1336), "6": (770, 1477), "7": (852, 1209), "8": (852, 1336),
        "9": (852, 1477), "0": (941, 1336), "*": (941, 1209), "#": (941, 1477)}


def sonic_pi_files() -> list[Path]:
    return sorted(SONIC_PI_DIR.glob("*.flac"))


def prefix(path: str | Path) -> str:
    return Path(path).name.split("_")[0]


def label(path: str | Path) -> str:
    """The one-word sound-event answer for a sonic-pi file."""
    pre = prefix(path)
    if pre == "mehackit":  # mehackit_phone1 / mehackit_robot3
        return Path(path).stem.split("_")[1].rstrip("0123456789")
    return PREFIX_LABEL[pre]


@lru_cache(maxsize=1)
def held_out_files() -> frozenset[str]:
    """Held-out sonic-pi file names: the held-out prefixes, plus the last file of every
    training prefix with at least 4 files (a sound-event eval on classes the model knows)."""
    by_prefix: dict[str, list[str]] = {}
    for p in sonic_pi_files():
        by_prefix.setdefault(prefix(p), []).append(p.name)
    out = set()
    for pre, names in by_prefix.items():
        if pre in HELD_OUT_PREFIXES:
            out |= set(names)
        elif len(names) >= 4:
            out.add(names[-1])
    return frozenset(out)


@lru_cache(maxsize=256)
def _load_sample(path: str) -> np.ndarray:
    import soundfile as sf

    wave, sr = sf.read(path, dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    return soxr.resample(wave, sr, SR, quality="HQ").astype(np.float32)


def sample(path: str, speed: float = 1.0, max_seconds: float = 8.0, offset: float = 0.0) -> np.ndarray:
    """A sonic-pi sample at 16 kHz; `speed` != 1 resamples (tape-style, pitch moves too)."""
    wave = _load_sample(str(path))
    start = int(offset * SR)
    wave = wave[start: start + int(max_seconds * SR / speed) + 1]
    if speed != 1.0:
        wave = soxr.resample(wave, SR * speed, SR, quality="HQ").astype(np.float32)
    return wave[: int(max_seconds * SR)]


def _env(n: int, attack: float = 0.01, release: float = 0.05) -> np.ndarray:
    a, r = max(1, int(attack * SR)), max(1, int(release * SR))
    env = np.ones(n, np.float32)
    env[:a] = np.linspace(0, 1, min(a, n), dtype=np.float32)[: min(a, n)]
    env[-r:] *= np.linspace(1, 0, min(r, n), dtype=np.float32)[-min(r, n):]
    return env


def tone(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32) * _env(len(t))


def chirp(f0: float, f1: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    # exponential sweep: phase = 2 pi f0 T/ln(k) (k^(t/T) - 1)
    k = f1 / f0
    phase = 2 * np.pi * f0 * seconds / np.log(k) * (k ** (t / seconds) - 1)
    return (0.5 * np.sin(phase)).astype(np.float32) * _env(len(t))


def dtmf(digits: str, tone_s: float = 0.15, gap_s: float = 0.1) -> np.ndarray:
    t = np.arange(int(tone_s * SR)) / SR
    out = []
    for d in digits:
        lo, hi = DTMF[d]
        out.append((0.25 * (np.sin(2 * np.pi * lo * t) + np.sin(2 * np.pi * hi * t))).astype(np.float32) * _env(len(t), 0.005, 0.005))
        out.append(np.zeros(int(gap_s * SR), np.float32))
    return np.concatenate(out)


def clicks(rate_hz: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(int(seconds * SR), np.float32)
    click = (np.exp(-np.arange(80) / 10.0) * rng.uniform(-1, 1, 80)).astype(np.float32) * 0.8
    for start in np.arange(0, seconds, 1 / rate_hz):
        i = int(start * SR)
        out[i: i + 80] += click[: len(out[i: i + 80])]
    return out


def noise(colour: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """white / pink / brown noise at RMS 0.1, shaped in the frequency domain."""
    n = int(seconds * SR)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1 / SR), 1.0)
    spec *= {"white": 1.0, "pink": f ** -0.5, "brown": f ** -1.0}[colour]
    wave = np.fft.irfft(spec, n)
    return (0.1 * wave / (np.sqrt(np.mean(wave ** 2)) + 1e-9)).astype(np.float32)


def silence(seconds: float, rng: np.random.Generator, level: float = 1e-4) -> np.ndarray:
    """Near silence: a very low noise floor, as a real recording of nothing has."""
    return (level * rng.standard_normal(int(seconds * SR))).astype(np.float32)
