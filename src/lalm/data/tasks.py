"""Plan the training corpus: which clips to render (recipes) and which examples use them.

Planning is cheap and single-threaded, drawn from one `random.Random(seed)`, so the plan
(and therefore every manifest and audio byte) depends only on the seed and the size.
Rendering the recipes is `render.py`'s job, in parallel.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from lalm.data import facts, music, phrases, sentences, sounds
from lalm.data import prompts as P
from lalm.data.voices import (
    ENGLISH_ACCENTS,
    FEMALE_VARIANTS,
    FLITE_VOICES,
    MALE_VARIANTS,
    OTHER_VARIANTS,
    Voice,
    pitch_label,
    rate_label,
)

# clips per task (train + dev); examples per clip vary by task.
# voice_chat 15,000 (was 3,000, then 9,000): a spoken question's answer has to be read from the
# audio rows directly, and a small decoder learns that per kind of question from spoken examples
# only (typed ones do not carry over): 3,000 -> 9,000 took held-out voice chat 22 -> 48% (two
# seeds), 9,000 -> 15,000 54 -> 70-73% (one seed per mix; docs/lalm-tiny.md, stops 18-19), for
# ~25 s of rendering and ~30 s of encoding per 3,000 short clips.
SIZES = {
    "small": {"asr": 120, "voice_chat": 50, "lid": 25, "sound": 40, "music": 20, "mixed": 10,
              "turns": 8, "silence": 5, "multi": 16, "multi_turn": 10, "eval_asr": 6,
              "eval_chat": 6},
    "full": {"asr": 7000, "voice_chat": 15000, "lid": 1500, "sound": 1500, "music": 900,
             "mixed": 500, "turns": 400, "silence": 150, "multi": 700, "multi_turn": 500,
             "eval_asr": 150, "eval_chat": 120},
}
DEV_SHARE = 0.05
# flite's clustergen voices (rms, awb, slt) sound less robotic than espeak-ng's formant synthesis:
# 3,000 more flite clips cut held-out Piper WER 60.9 -> 55.4% in an ASR-only run (docs/lalm-tiny.md)
FLITE_SHARE = 0.35
NOISE_SHARE = 0.15  # speech clips with added noise at a known SNR
# Spoken questions also transcribed in pre-training: about 3,000 of the 15,000, as many as when
# every one of 3,000 was, so pre-training's mix (and its held-out WER) stays as measured; all
# 9,000 of stop 18 cost 7 points of Piper WER (docs/lalm-tiny.md).
QUESTION_ASR_SHARE = 1 / 5
# Spoken questions by kind (lalm.data.facts), training only: the held-out set draws the kinds
# uniformly. Arithmetic holds ~960 facts (sums and differences of 0-20, products of 2-10), the
# other kinds a few dozen to a few hundred, and a small decoder learns them only from many spoken
# examples: 6,000 more arithmetic questions took held-out spoken arithmetic 7 -> 27 of 30 where
# 6,000 more of every kind took it to 12 (docs/lalm-tiny.md, stop 19).
QUESTION_KINDS = {"arithmetic": 4, "spelling": 1, "comparison": 1, "counting": 1, "fact": 1}


@dataclass
class Clip:
    id: str  # "asr/000123" -> audio/asr/000123.wav
    recipe: dict
    source: str
    meta: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"audio/{self.id}.wav"


def audio(clip: Clip) -> dict:
    return {"type": "audio", "audio": clip.path}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def assistant(t: str) -> dict:
    return {"role": "assistant", "content": t}


class Planner:
    """Holds the clips and the examples of each manifest ("pretrain/train", ...)."""

    def __init__(self, size: str, seed: int, reserved_text: set[str]):
        self.n = SIZES[size]
        self.rng = random.Random(seed)
        self.clips: list[Clip] = []
        self.out: dict[str, list[dict]] = defaultdict(list)
        self.vocab = sentences.wordfreq_vocab()
        self.reserved = reserved_text  # held-out eval text: never spoken in training
        self.by_kind: dict[str, dict[str, list[Clip]]] = defaultdict(lambda: defaultdict(list))
        self.voices_used: set[str] = set()

    # ---------------------------------------------------------------- helpers
    def clip(self, kind: str, recipe: dict, source: str, split: str, **meta) -> Clip:
        c = Clip(f"{kind}/{len(self.by_kind[kind]['train']) + len(self.by_kind[kind]['dev']):06d}",
                 recipe, source, meta)
        self.clips.append(c)
        self.by_kind[kind][split].append(c)
        return c

    def split(self) -> str:
        return "dev" if self.rng.random() < DEV_SHARE else "train"

    def emit(self, stage: str, split: str, task: str, source: str, messages: list[dict],
             meta: dict | None = None, **extra) -> None:
        if self.rng.random() < 0.1 and stage != "dpo":  # a system prompt now and then
            messages = [{"role": "system", "content": self.rng.choice(P.SYSTEMS)}] + messages
        rec = {"source": source, "task": task, "messages": messages, **extra}
        if meta:
            rec["meta"] = meta
        self.out[f"{stage}/{split}"].append(rec)

    def voice(self, english: bool = True, lang: str = "en") -> Voice:
        rng = self.rng
        rate = rng.choice((rng.randint(115, 149), rng.randint(150, 205), rng.randint(150, 205),
                           rng.randint(206, 250)))
        pitch = rng.randint(15, 90)
        if english and rng.random() < FLITE_SHARE:
            name = rng.choice(sorted(FLITE_VOICES))
            gender, accent = FLITE_VOICES[name]
            v = Voice("flite", name, gender, accent, min(rate, 220), rng.choice((50, 50, pitch)))
        else:
            r = rng.random()
            variant = rng.choice(FEMALE_VARIANTS if r < 0.45 else MALE_VARIANTS if r < 0.85
                                 else OTHER_VARIANTS)
            gender = ("female" if variant in FEMALE_VARIANTS else
                      "male" if variant in MALE_VARIANTS else None)
            base = rng.choice(sorted(ENGLISH_ACCENTS)) if english else phrases.ESPEAK_VOICE[lang]
            accent = ENGLISH_ACCENTS.get(base) if english else None
            v = Voice("espeak-ng", f"{base}+{variant}", gender, accent, rate, pitch)
        self.voices_used.add(v.source)
        return v

    def speech(self, v: Voice, words: str, augment: bool = True) -> dict:
        recipe = {"kind": "tts", "engine": v.engine, "voice": v.name, "rate": v.rate,
                  "pitch": v.pitch, "gender": v.gender, "text": words,
                  "gain_db": round(self.rng.uniform(-10, 0), 1)}
        if augment and self.rng.random() < NOISE_SHARE:
            recipe["noise"] = {"colour": self.rng.choice(("white", "pink", "brown")),
                               "snr_db": self.rng.choice((5, 10, 15, 20)),
                               "seed": self.rng.randrange(2**31)}
        return recipe

    def new_text(self, gen) -> str:
        for _ in range(50):
            t = gen()
            if t not in self.reserved:
                return t
        raise RuntimeError("text generator keeps hitting held-out text")

    # ---------------------------------------------------------------- tasks
    def asr(self) -> None:
        rng = self.rng
        for _ in range(self.n["asr"]):
            split, v = self.split(), self.voice()
            kind = sentences.sentence(rng, self.vocab)[0]
            words = self.new_text(lambda k=kind: sentences.sentence(rng, self.vocab, k)[1])
            rec = self.speech(v, sentences.spoken(kind, words))
            meta = {"voice": v.name, "rate": v.rate, "pitch": v.pitch}
            if "noise" in rec:
                meta["snr_db"] = rec["noise"]["snr_db"]
            c = self.clip("asr", rec, v.source, split, **meta, text=words, gender=v.gender,
                          accent=v.accent)
            if rng.random() < 0.12:
                self.emit("pretrain", split, "asr", v.source,
                          [user(audio(c), text(rng.choice(P.ASR_LANG))), assistant(f"<|en|>{words}")], meta)
            else:
                self.emit("pretrain", split, "asr", v.source,
                          [user(audio(c), text(P.pick(rng, P.ASR, 0.3))), assistant(words)], meta)
            if rng.random() < 0.6:  # SFT keeps transcribing: text-heavy SFT cost lalm-tiny ~8 points of WER
                q = P.pick(rng, P.ASR, 0.6)
                parts = [text(q), audio(c)] if rng.random() < 0.2 else [audio(c), text(q)]
                self.emit("sft", split, "asr", v.source, [user(*parts), assistant(words)], meta)
            if rng.random() < 0.05:
                wrong = self.wrong_transcript(words)
                rej = rng.choice((wrong, rng.choice(P.HEDGES).format(x=f'"{words}"')))
                self.emit("dpo", split, "asr", v.source, [user(audio(c), text(P.ASR_CANONICAL))],
                          meta, chosen=words, rejected=rej)
            self.speaker_questions(c, v, split, meta)

    def wrong_transcript(self, words: str) -> str:
        w = words.split()
        i = self.rng.randrange(len(w))
        if len(w) > 2 and self.rng.random() < 0.4:
            del w[i]
        else:
            w[i] = self.rng.choice(self.vocab[:3000])
        out = " ".join(w)
        return out if out != words else out + " " + self.rng.choice(self.vocab[:500])

    def speaker_questions(self, c: Clip, v: Voice, split: str, meta: dict) -> None:
        rng = self.rng
        choices = [("rate", P.RATE, rate_label(v.rate)), ("pitch", P.PITCH, pitch_label(v.pitch))]
        if v.gender:
            choices.append(("gender", P.GENDER, v.gender))
        if v.accent and v.engine == "espeak-ng":
            choices.append(("accent", P.ACCENT, v.accent))
        if rng.random() < 0.25:
            attr, qs, ans = rng.choice(choices)
            stage = "pretrain" if rng.random() < 0.6 else "sft"
            self.emit(stage, split, "speaker", v.source, [user(audio(c), text(rng.choice(qs))),
                                                         assistant(ans)], {**meta, "attribute": attr})
        # Coarse type: about as many speech and music answers as sound ones. At 6% of speech
        # clips and 40% of melodies SFT held 402 speech and 411 music answers against 592 sound
        # ones, and every coarse error of the held-out set was a "sound" (docs/lalm-tiny.md).
        if rng.random() < 0.12:
            self.emit("sft", split, "coarse", v.source,
                      [user(audio(c), text(P.pick(rng, P.COARSE, 0.7))), assistant("speech")], meta)

    def voice_chat(self) -> None:
        rng = self.rng
        for _ in range(self.n["voice_chat"]):
            split, v = self.split(), self.voice()
            kind = rng.choices(list(QUESTION_KINDS), weights=list(QUESTION_KINDS.values()))[0]
            _, q, ans, wrong = facts.question(rng, kind)
            while q in self.reserved:
                _, q, ans, wrong = facts.question(rng, kind)
            c = self.clip("chat", self.speech(v, q), v.source, split, text=q, answer=ans,
                          wrong=wrong)
            meta = {"voice": v.name, "kind": kind, "question": q}
            self.emit("sft", split, "voice_chat", v.source, [user(audio(c)), assistant(ans)], meta)
            if rng.random() < 0.3:
                self.emit("sft", split, "voice_chat", v.source,
                          [user(audio(c), text(rng.choice(P.VOICE_CHAT_TEXT))), assistant(ans)], meta)
            # Spoken questions are also transcribed in pre-training: a voice-chat answer starts
            # with hearing the question's words (lalm-tiny answered 77% of the eval questions
            # typed but 9% spoken; docs/lalm-tiny.md).
            if rng.random() < QUESTION_ASR_SHARE:
                self.emit("pretrain", split, "asr", v.source,
                          [user(audio(c), text(P.pick(rng, P.ASR, 0.3))), assistant(q)], meta)
            if rng.random() < 0.12:
                rej = wrong if rng.random() < 0.5 else rng.choice(P.HEDGES).format(x=ans)
                self.emit("dpo", split, "voice_chat", v.source, [user(audio(c))], meta,
                          chosen=ans, rejected=rej)

    def lid(self) -> None:
        rng = self.rng
        for _ in range(self.n["lid"]):
            split = self.split()
            lang = rng.choice(phrases.LANGS)
            row = rng.choice(phrases.PHRASES)
            v = self.voice(english=False, lang=lang) if lang != "en" else self.voice()
            c = self.clip("lid", self.speech(v, row[lang]), v.source, split, lang=lang)
            meta = {"voice": v.name, "lang": lang}
            self.emit("pretrain", split, "lid", v.source,
                      [user(audio(c), text(rng.choice(P.ASR_LANG))), assistant(f"<|{lang}|>{row[lang]}")], meta)
            name = phrases.LANG_NAMES[lang].lower()
            stage = "pretrain" if rng.random() < 0.5 else "sft"
            self.emit(stage, split, "lid", v.source,
                      [user(audio(c), text(rng.choice(P.LID))), assistant(name)], meta)
            target = "en" if lang != "en" else rng.choice(phrases.LANGS[1:])
            q = rng.choice(P.S2TT).format(lang=phrases.LANG_NAMES[target])
            self.emit("pretrain" if rng.random() < 0.6 else "sft", split, "s2tt", v.source,
                      [user(audio(c), text(q)), assistant(row[target])], {**meta, "target_lang": target})

    def sound(self) -> None:
        rng = self.rng
        held = sounds.held_out_files()
        files = [f for f in sounds.sonic_pi_files() if f.name not in held]
        for i in range(self.n["sound"]):
            split, seed = self.split(), rng.randrange(2**31)
            if i % 5 < 3:  # sonic-pi sample, tape-speed and gain varied
                f = rng.choice(files)
                recipe = {"kind": "sample", "path": str(f), "speed": round(rng.uniform(0.85, 1.15), 3),
                          "max_seconds": 6.0, "gain_db": round(rng.uniform(-12, 0), 1)}
                src, label = f"sonic-pi:{f.name}", sounds.label(f)
                coarse = sounds.PREFIX_COARSE.get(sounds.prefix(f))
                qa = []
            else:
                label = rng.choice(sounds.SYNTH_LABELS[:-1])
                recipe = {"kind": "synth", "type": label, "seed": seed,
                          "seconds": round(rng.uniform(0.8, 4.0), 2), "gain_db": round(rng.uniform(-12, 0), 1)}
                qa = []
                if label == "tone":
                    recipe["freq"] = rng.choice((220, 330, 440, 550, 660, 880, 1000, 1500, 2000))
                elif label == "chirp":
                    recipe["f0"], recipe["f1"] = rng.choice(((200, 2000), (2000, 200), (300, 4000), (100, 1000)))
                elif label == "dtmf":
                    recipe["digits"] = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8)))
                    qa.append((rng.choice(P.DTMF), recipe["digits"]))
                elif label == "clicks":
                    recipe["rate_hz"] = rng.choice((2, 4, 8, 16))
                elif label == "noise":
                    recipe["colour"] = rng.choice(("white", "pink", "brown"))
                    qa.append((rng.choice(P.NOISE_COLOUR), recipe["colour"]))
                src, coarse = f"synth:{label}", "sound"
            c = self.clip("sound", recipe, src, split, label=label, coarse=coarse)
            self.emit("pretrain", split, "sound", src,
                      [user(audio(c), text(P.pick(rng, P.SOUND, 0.3))), assistant(label)])
            if rng.random() < 0.4:
                self.emit("sft", split, "sound", src,
                          [user(audio(c), text(P.pick(rng, P.SOUND, 0.6))), assistant(label)])
            for q, a in qa:
                self.emit("sft", split, "sound", src, [user(audio(c), text(q)), assistant(a)])
            if coarse and rng.random() < 0.5:
                self.emit("sft", split, "coarse", src,
                          [user(audio(c), text(P.pick(rng, P.COARSE, 0.7))), assistant(coarse)])
            if rng.random() < 0.05:
                wrong = rng.choice([x for x in ("kick", "snare", "tone", "noise", "bell", "drum") if x != label])
                self.emit("dpo", split, "sound", src, [user(audio(c), text(P.SOUND_CANONICAL))],
                          chosen=label, rejected=rng.choice((wrong, rng.choice(P.HEDGES).format(x=label))))
        for _ in range(self.n["silence"]):
            split = self.split()
            recipe = {"kind": "synth", "type": "silence", "seed": rng.randrange(2**31),
                      "seconds": round(rng.uniform(0.5, 4.0), 2), "gain_db": 0.0}
            c = self.clip("sound", recipe, "synth:silence", split, label="silence", coarse="silence")
            self.emit("sft", split, "coarse", "synth:silence",
                      [user(audio(c), text(P.pick(rng, P.COARSE, 0.5))), assistant("silence")])
            self.emit("pretrain", split, "sound", "synth:silence",
                      [user(audio(c), text(P.pick(rng, P.SOUND, 0.3))), assistant("silence")])

    def music(self) -> None:
        rng = self.rng
        for _ in range(self.n["music"]):
            split = self.split()
            key, mode = rng.choice(music.KEYS), rng.choice(sorted(music.MODES))
            bpm, timbre = rng.randrange(60, 181), rng.choice(music.TIMBRES)
            recipe = {"kind": "melody", "key": key, "mode": mode, "bpm": bpm, "timbre": timbre,
                      "seconds": round(rng.uniform(3.0, 8.0), 2), "seed": rng.randrange(2**31),
                      "bass": rng.random() < 0.7, "gain_db": round(rng.uniform(-10, 0), 1)}
            src = f"synth:melody-{timbre}"
            c = self.clip("music", recipe, src, split, coarse="music")
            inst = music.TIMBRE_INSTRUMENT[timbre]
            caption = (f"a {music.tempo_label(bpm)} melody in {key} {mode} played on "
                       f"{'an' if inst[0] in 'aeiou' else 'a'} {inst} at {bpm} beats per minute")
            meta = {"key": key, "mode": mode, "bpm": bpm, "timbre": timbre}
            self.emit("pretrain", split, "music", src,
                      [user(audio(c), text(rng.choice(P.MUSIC_CAPTION))), assistant(caption)], meta)
            for qs, ans in rng.sample([(P.TEMPO, music.tempo_label(bpm)), (P.BPM, str(bpm)),
                                       (P.KEY, f"{key} {mode}"), (P.MODE, mode),
                                       (P.INSTRUMENT, inst)], 2):
                self.emit(rng.choice(("pretrain", "sft")), split, "music", src,
                          [user(audio(c), text(rng.choice(qs))), assistant(ans)], meta)
            if rng.random() < 0.8:
                self.emit("sft", split, "coarse", src,
                          [user(audio(c), text(P.pick(rng, P.COARSE, 0.7))), assistant("music")], meta)

    def mixed(self) -> None:
        rng = self.rng
        for _ in range(self.n["mixed"]):
            split, v = self.split(), self.voice()
            words = self.new_text(lambda: sentences.sentence(rng, self.vocab, "everyday")[1])
            speech = self.speech(v, words, augment=False)
            if rng.random() < 0.5:
                bg, what = {"kind": "melody", "key": rng.choice(music.KEYS), "mode": "major",
                            "bpm": rng.randrange(70, 160), "timbre": rng.choice(music.TIMBRES),
                            "seconds": 8.0, "seed": rng.randrange(2**31), "bass": True,
                            "gain_db": 0.0}, "music"
            else:
                bg, what = {"kind": "synth", "type": "noise", "colour": rng.choice(("white", "pink", "brown")),
                            "seconds": 8.0, "seed": rng.randrange(2**31), "gain_db": 0.0}, "noise"
            snr = rng.choice((5, 10, 15))
            src = f"{v.source} + synth:{'melody' if what == 'music' else what}"
            c = self.clip("mixed", {"kind": "mix", "fg": speech, "bg": bg, "snr_db": snr}, src,
                          split, text=words)
            meta = {"voice": v.name, "background": what, "snr_db": snr}
            self.emit("pretrain", split, "mixed", src,
                      [user(audio(c), text(P.pick(rng, P.ASR, 0.3))), assistant(words)], meta)
            self.emit(rng.choice(("pretrain", "sft")), split, "mixed", src,
                      [user(audio(c), text(rng.choice(P.MIX_BACKGROUND))), assistant(what)], meta)
        for _ in range(self.n["turns"]):
            split, k = self.split(), rng.choice((1, 2, 2, 3, 3))
            vs: list[Voice] = []
            while len({x.name for x in vs}) < k:
                vs.append(self.voice())
                vs = list({x.name: x for x in vs}.values())
            order = [vs[i % k] for i in range(k + rng.randint(0, 2))]
            texts = [self.new_text(lambda: sentences.sentence(rng, self.vocab, "everyday")[1])
                     for _ in order]
            parts = [self.speech(v, t, augment=False) for v, t in zip(order, texts)]
            src = " + ".join(dict.fromkeys(v.source for v in order))
            c = self.clip("turns", {"kind": "concat", "parts": parts, "gap_s": 0.3}, src, split)
            self.emit(rng.choice(("pretrain", "sft")), split, "turns", src,
                      [user(audio(c), text(rng.choice(P.TURNS))), assistant(str(k))], {"speakers": k})

    def multi(self) -> None:
        """SFT with several audios in a turn, and multi-turn voice chat."""
        rng = self.rng
        for split in ("train", "dev"):
            speech = self.by_kind["asr"][split]
            other = [c for c in self.by_kind["sound"][split] + self.by_kind["music"][split]]
            chat = self.by_kind["chat"][split]
            n = self.n["multi"] if split == "train" else max(1, int(self.n["multi"] * DEV_SHARE))
            for _ in range(n if speech and other else 0):
                if rng.random() < 0.5:
                    a, b = rng.choice(speech), rng.choice(other)
                    first = rng.random() < 0.5
                    pair = (a, b) if first else (b, a)
                    self.emit("sft", split, "multi_audio", f"{pair[0].source} + {pair[1].source}",
                              [user(audio(pair[0]), audio(pair[1]), text(rng.choice(P.WHICH_SPEECH))),
                               assistant("1" if first else "2")])
                else:
                    a, b = rng.sample(speech, 2)
                    self.emit("sft", split, "multi_audio", f"{a.source} + {b.source}",
                              [user(audio(a), audio(b), text(rng.choice(P.BOTH_ASR))),
                               assistant(f"1: {a.meta['text']}\n2: {b.meta['text']}")])
            n = self.n["multi_turn"] if split == "train" else max(1, int(self.n["multi_turn"] * DEV_SHARE))
            for _ in range(n if len(chat) >= 2 else 0):
                a, b = rng.sample(chat, 2)
                msgs = [user(audio(a)), assistant(a.meta["answer"])]
                if rng.random() < 0.5:
                    msgs += [user(audio(b)), assistant(b.meta["answer"])]
                else:
                    msgs += [user(text(rng.choice(("What was my question?", "What did I just ask?",
                                                   "Repeat my question.")))), assistant(a.meta["text"])]
                self.emit("sft", split, "voice_chat", f"{a.source} + {b.source}", msgs)


def plan(size: str, seed: int, reserved_text: set[str]) -> Planner:
    p = Planner(size, seed, reserved_text)
    p.asr()
    p.voice_chat()
    p.lid()
    p.sound()
    p.music()
    p.mixed()
    p.multi()
    return p
