"""Development evaluation sets from the held-out sources, written under DIR/eval/.

- asr_piper: the Piper joe voice (never in training) reading held-out sentences
- voice_chat_piper: joe asking held-out questions; the user turn holds only audio
- asr_real: real human speech, pocketsphinx-testdata and alsa-utils channel names
- sound: held-out sonic-pi files of classes seen in training
- coarse: held-out sonic-pi prefixes and files, joe and real speech, fresh melodies

Each line carries "reference" (the exact answer) and "lang" where relevant.
"""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

from lalm.data import facts, music, sentences, sounds
from lalm.data import prompts as P
from lalm.data.tasks import Clip, audio, text, user
from lalm.data.voices import PIPER_VOICE

POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")
ALSA_SOUNDS = Path("/usr/share/sounds/alsa")
HELD_OUT_ENGINES = ("piper", "pocketsphinx-testdata", "alsa-utils")


def is_held_out(source: str) -> bool:
    """True if any part of a source string (parts joined by ' + ') is a held-out source."""
    held_files = sounds.held_out_files()
    for part in source.split(" + "):
        engine, _, name = part.partition(":")
        if engine in HELD_OUT_ENGINES or (engine == "sonic-pi" and name in held_files):
            return True
    return False


def _package_files(package: str, pattern: str) -> list[Path]:
    """Files of a Debian package matching `pattern`; falls back to the usual paths."""
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
        return sorted(Path(p) for p in out.splitlines() if re.search(pattern, p) and Path(p).is_file())
    except (OSError, subprocess.CalledProcessError):
        return []


def real_speech() -> list[tuple[str, str, str]]:
    """(path, transcript, source) for the real-speech recordings that are installed."""
    items = []
    for sub in ("librivox", "cards"):
        for tf in _package_files("pocketsphinx-testdata", rf"/{sub}/(cards\.)?transcription$"):
            for line in tf.read_text().splitlines():
                m = re.match(r"<s>(.*)</s>\s*\((.+)\)", line.strip())
                if m:
                    wav = tf.parent / f"{m.group(2)}.wav"
                    if wav.is_file():
                        items.append((str(wav), " ".join(m.group(1).split()),
                                      f"pocketsphinx-testdata:{sub}/{wav.name}"))
    raw = POCKETSPHINX / "goforward.raw"  # 16 kHz s16le, transcript in the package's tests
    if raw.is_file():
        items.append((str(raw), "go forward ten meters", "pocketsphinx-testdata:goforward.raw"))
    for wav in _package_files("alsa-utils", r"\.wav$"):
        if wav.stem != "Noise":  # Front_Left.wav -> "front left"
            items.append((str(wav), wav.stem.replace("_", " ").lower(), f"alsa-utils:{wav.name}"))
    return items


def real_subset(source: str) -> str:
    """The group of a real recording: librivox, cards, goforward (pocketsphinx-testdata) or alsa-utils."""
    package, _, name = source.partition(":")
    return package if package == "alsa-utils" else name.split("/")[0].removesuffix(".raw")


class EvalPlanner:
    def __init__(self, n_asr: int, n_chat: int, seed: int):
        self.rng = random.Random(seed * 7919 + 17)  # a stream of its own: not the training one
        self.n_asr, self.n_chat = n_asr, n_chat
        self.clips: list[Clip] = []
        self.out: dict[str, list[dict]] = {}
        self.reserved: set[str] = set()

    def _clip(self, name: str, recipe: dict, source: str) -> Clip:
        c = Clip(f"eval/{name}/{sum(1 for x in self.clips if x.id.startswith(f'eval/{name}/')):05d}",
                 recipe, source)
        self.clips.append(c)
        return c

    def _line(self, name: str, c: Clip, task: str, parts: list[dict], ref: str,
              lang: str | None = None, question: str | None = None, subset: str | None = None):
        rec = {"source": c.source, "task": task, "messages": [user(*parts)], "reference": ref}
        if lang:
            rec["lang"] = lang
        if question:  # the spoken question as text, for judges and error analysis
            rec["question"] = question
        if subset:  # the kind of text or question: `lalm eval` scores each one apart too
            rec["subset"] = subset
        self.out.setdefault(name, []).append(rec)

    def plan(self, vocab: list[str]) -> None:
        rng, piper_src = self.rng, f"piper:{PIPER_VOICE}"
        asr: dict[str, str] = {}  # text -> kind
        while len(asr) < self.n_asr:
            kind, t = sentences.sentence(rng, vocab)
            if len(t.split()) >= 2:
                asr.setdefault(t, kind)
        for t, kind in asr.items():
            c = self._clip("asr_piper", {"kind": "tts", "engine": "piper", "voice": PIPER_VOICE,
                                         "rate": 175, "pitch": 50, "text": sentences.spoken(kind, t),
                                         "gain_db": 0.0}, piper_src)
            self._line("asr_piper", c, "asr", [audio(c), text(P.ASR_CANONICAL)], t, "en", subset=kind)
        qs: dict[str, tuple[str, str]] = {}  # question -> (answer, kind)
        while len(qs) < self.n_chat:
            qkind, q, ans, _ = facts.question(rng)
            qs.setdefault(q, (ans, qkind))
        for q, (ans, qkind) in qs.items():
            c = self._clip("voice_chat_piper", {"kind": "tts", "engine": "piper", "voice": PIPER_VOICE,
                                                "rate": 175, "pitch": 50, "text": q, "gain_db": 0.0}, piper_src)
            self._line("voice_chat_piper", c, "voice_chat", [audio(c)], ans, "en", q, subset=qkind)
        self.reserved = set(asr) | set(qs)
        coarse_speech = []
        for path, t, src in real_speech():
            self.reserved.add(t)
            kind = "raw16" if path.endswith(".raw") else "file"
            c = self._clip("asr_real", {"kind": kind, "path": path, "max_seconds": 30.0, "gain_db": 0.0}, src)
            self._line("asr_real", c, "asr", [audio(c), text(P.ASR_CANONICAL)], t, "en", subset=real_subset(src))
            coarse_speech.append(c)
        held = sounds.held_out_files()
        for f in sounds.sonic_pi_files():
            if f.name not in held:
                continue
            c = self._clip("sounds", {"kind": "sample", "path": str(f), "speed": 1.0,
                                      "max_seconds": 6.0, "gain_db": 0.0}, f"sonic-pi:{f.name}")
            if sounds.prefix(f) not in sounds.HELD_OUT_PREFIXES:
                self._line("sound", c, "sound", [audio(c), text(P.SOUND_CANONICAL)], sounds.label(f))
            coarse = sounds.PREFIX_COARSE.get(sounds.prefix(f))
            if coarse:
                self._line("coarse", c, "coarse", [audio(c), text(P.COARSE_CANONICAL)], coarse)
        speech = [c for c in self.clips if c.id.startswith("eval/asr_piper/")][:10] + coarse_speech[:10]
        for c in speech:
            self._line("coarse", c, "coarse", [audio(c), text(P.COARSE_CANONICAL)], "speech", "en")
        for timbre in music.TIMBRES * 3:  # fresh melodies: synthesis is not held out, the renders are new
            c = self._clip("melody", {"kind": "melody", "key": rng.choice(music.KEYS),
                                      "mode": rng.choice(sorted(music.MODES)), "bpm": rng.randrange(70, 170),
                                      "timbre": timbre, "seconds": 5.0, "seed": rng.randrange(2**31),
                                      "bass": True, "gain_db": 0.0}, f"synth:melody-{timbre}")
            self._line("coarse", c, "coarse", [audio(c), text(P.COARSE_CANONICAL)], "music")
