"""Synthesised melodies with known tempo, key, mode and timbre (float32 mono 16 kHz).

A melody is a random walk on the scale of its key over a steady beat, with an optional
bass note on each bar and a soft click on each beat so the tempo is audible.
"""

from __future__ import annotations

import numpy as np

SR = 16000
KEYS = ("c", "c sharp", "d", "e flat", "e", "f", "f sharp", "g", "a flat", "a", "b flat", "b")
MODES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
TIMBRES = ("sine", "square", "sawtooth", "pluck", "organ", "bell")
# timbre -> instrument-like one-word answer for "What instrument plays this?"
TIMBRE_INSTRUMENT = {"sine": "flute", "square": "chiptune", "sawtooth": "synthesizer",
                     "pluck": "guitar", "organ": "organ", "bell": "bell"}


def tempo_label(bpm: int) -> str:
    return "slow" if bpm < 90 else "fast" if bpm > 135 else "medium"


def _note(freq: float, seconds: float, timbre: str, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * SR)
    t = np.arange(n) / SR
    ph = 2 * np.pi * freq * t
    if timbre == "sine":
        w = np.sin(ph)
    elif timbre == "square":
        w = 0.5 * np.sign(np.sin(ph))
    elif timbre == "sawtooth":
        w = 0.6 * (2 * ((freq * t) % 1.0) - 1)
    elif timbre == "organ":
        w = sum(np.sin(k * ph) / k for k in (1, 2, 3, 4)) / 1.6
    elif timbre == "bell":  # inharmonic partials, fast decay
        w = sum(np.sin(r * ph) / (i + 1) for i, r in enumerate((1, 2.76, 5.4))) * np.exp(-4 * t)
    elif timbre == "pluck":  # Karplus-Strong string
        period = max(2, round(SR / freq))
        buf = rng.uniform(-1, 1, period)
        w = np.empty(n)
        for i in range(n):
            w[i] = buf[i % period]
            buf[i % period] = 0.996 * 0.5 * (buf[i % period] + buf[(i + 1) % period])
    else:
        raise ValueError(timbre)
    a, r = int(0.01 * SR), int(0.04 * SR)
    env = np.ones(n)
    env[:a] = np.linspace(0, 1, a)
    env[-r:] *= np.linspace(1, 0, r)
    return (w * env).astype(np.float32)


def melody(key: str, mode: str, bpm: int, timbre: str, seconds: float,
           rng: np.random.Generator, bass: bool = True, beat_clicks: bool = True) -> np.ndarray:
    """A melody of about `seconds` in `key` `mode` at `bpm` played with `timbre`."""
    beat = 60.0 / bpm
    root = 60 + KEYS.index(key)  # MIDI note of the tonic around middle C
    scale = MODES[mode]
    n = int(seconds * SR)
    out = np.zeros(n + SR, np.float32)
    degree, pos, k = 0, 0.0, 0
    while pos < seconds:
        dur = beat * rng.choice((0.5, 1.0, 1.0, 2.0))
        # start and end on the tonic so the key is unambiguous
        if k > 0 and pos + dur < seconds - beat:
            degree = int(np.clip(degree + rng.choice((-2, -1, -1, 1, 1, 2, 3)), -3, 9))
        else:
            degree = 0 if k == 0 else 7
        midi = root + 12 * (degree // 7) + scale[degree % 7]
        freq = 440.0 * 2 ** ((midi - 69) / 12)
        note = _note(freq, dur, timbre, rng) * 0.4
        i = int(pos * SR)
        out[i: i + len(note)] += note[: len(out) - i]
        pos += dur
        k += 1
    bar = 4 * beat
    for b in np.arange(0, seconds, bar):
        if bass:  # the tonic (or the fifth on odd bars) two octaves down
            midi = root - 24 + (7 if int(b / bar) % 2 else 0)
            note = _note(440.0 * 2 ** ((midi - 69) / 12), bar * 0.9, "sine", rng) * 0.3
            i = int(b * SR)
            out[i: i + len(note)] += note[: len(out) - i]
    if beat_clicks:
        click = (np.exp(-np.arange(160) / 25.0) * np.sin(np.arange(160) * 0.9)).astype(np.float32) * 0.25
        for b in np.arange(0, seconds, beat):
            i = int(b * SR)
            out[i: i + 160] += click[: len(out) - i]
    return out[:n]
