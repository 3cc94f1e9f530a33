"""The lalm-tiny recipe around the three stage configs: what `lalm demo` trains on, and how.

configs/tiny/demo.yaml holds the knobs that are not `TrainConfig` keys: the corpus size, the
BPE vocabulary, how many clips of each kind to encode (the frozen encoder is the dearest part
of a CPU run, so the corpus is subsampled by clip, not by line), how many text-only questions
to add, evaluation batch size, and per-stage `TrainConfig` overrides (feature augmentation is
a `TrainConfig` key: feature_dropout and co. in the stage configs).
configs/tiny/quick.yaml is merged on top for `lalm demo --quick` (the test-sized run).

`select_manifests` writes the training manifests the stages read (ordinary lalm manifests with
absolute audio paths, so `lalm train` can use them too). Text-only questions come from the
corpus's own fact generator with a seed of their own, minus every question of the held-out
voice-chat eval set, so the decoder learns the answers more cheaply than from audio alone.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from lalm.data import facts
from lalm.data.manifest import load_records
from lalm.errors import ConfigError

STAGES = ("pretrain", "sft", "dpo")
_KIND = re.compile(r"/audio/([^/]+)/[^/]+$")


@dataclass
class Recipe:
    corpus_size: str = "full"
    corpus_seed: int = 0
    workers: int = 2
    vocab_size: int = 2048
    clips: dict = field(default_factory=dict)  # clip kind (audio/<kind>/...) -> at most this many; absent: all
    dev_records: int = 96  # per stage: held-out lines scored during training
    text_qa: int = 0  # text-only question/answer lines added to SFT
    text_qa_seed: int = 1234
    spoken_qa_repeat: int = 1  # each SFT line whose user turns are audio alone appears this many times
    asr_repeat: int = 1  # each SFT transcription line (task "asr") appears this many times
    pretrain_chat: float = 0.0  # share of pre-training lines rendered in the chat template ("format": "chat")
    eval_batch_size: int = 16
    eval_limit: int = 0  # at most N items per eval set (0 = all)
    eval_max_new_tokens: int = 64
    num_beams: int = 1  # how the trained model decodes (its generation_config.json; the demo's eval too)
    threads: int = 0  # torch threads: at most this many, never more than the cores (0 = all cores)
    stages: dict = field(default_factory=dict)  # stage -> {TrainConfig key: value}

    @classmethod
    def load(cls, folder: str | Path, quick: bool = False) -> Recipe:
        folder = Path(folder)
        d: dict = {}
        for name in ("demo.yaml",) + (("quick.yaml",) if quick else ()):
            path = folder / name
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise ConfigError(f"{path}: cannot read the recipe: {e}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: a recipe is a mapping of key: value")
            known = {f.name for f in fields(cls)}
            for key, value in raw.items():
                if key not in known:
                    raise ConfigError(f"{path}: unknown recipe key {key!r}")
                if key in ("clips", "stages") and isinstance(value, dict):
                    merged = dict(d.get(key, {}))
                    for k, v in value.items():
                        merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) else v
                    d[key] = merged
                else:
                    d[key] = value
        recipe = cls(**d)
        for stage in recipe.stages:
            if stage not in STAGES:
                raise ConfigError(f"{folder}: stages.{stage}: not one of {', '.join(STAGES)}")
        if not 0.0 <= recipe.pretrain_chat <= 1.0:
            raise ConfigError(f"{folder}: pretrain_chat must be a share in [0, 1], got {recipe.pretrain_chat}")
        return recipe

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def clip_kind(path: str) -> str:
    m = _KIND.search(str(path))
    return m.group(1) if m else "other"


def _audio(rec: dict) -> list[str]:
    return [p["audio"] for m in rec["messages"] if isinstance(m["content"], list)
            for p in m["content"] if p.get("type") == "audio"]


def spoken_only(rec: dict) -> bool:
    """A voice-chat line: every user turn is audio alone (a spoken instruction, no text)."""
    users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
    return bool(users) and all(
        isinstance(c, list) and c and all(p.get("type") == "audio" for p in c) for c in users
    )


def _rank(path: str) -> str:
    """A fixed pseudo-random order of clips (so a larger quota keeps the smaller one's clips)."""
    return hashlib.sha1(Path(path).name.encode() + clip_kind(path).encode()).hexdigest()


def choose_clips(corpus: Path, quotas: dict) -> set[str]:
    """At most quotas[kind] training clips of each kind (all of a kind without a quota)."""
    by_kind: dict[str, set[str]] = {}
    for stage in STAGES:
        for rec in load_records(corpus / stage / "train.jsonl"):
            for p in _audio(rec):
                by_kind.setdefault(clip_kind(p), set()).add(p)
    chosen = set()
    for kind, paths in by_kind.items():
        n = quotas.get(kind)
        ordered = sorted(paths, key=_rank)
        chosen.update(ordered if n is None else ordered[: int(n)])
    return chosen


def eval_questions(corpus: Path) -> set[str]:
    """Every spoken question of the held-out eval sets (never to be trained on, even as text)."""
    out = set()
    for f in sorted((corpus / "eval").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                q = json.loads(line).get("question")
                if q:
                    out.add(q)
    return out


def text_questions(n: int, seed: int, exclude: set[str]) -> list[dict]:
    """n text-only voice-chat style lines: the question typed instead of spoken."""
    rng = random.Random(seed)
    out, tries = [], 0
    while len(out) < n and tries < 50 * max(n, 1):
        tries += 1
        kind, q, ans, _ = facts.question(rng)
        if q in exclude:
            continue
        out.append({"id": f"text-qa-{len(out):06d}", "source": "text:facts", "task": "text_chat",
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}],
                    "meta": {"kind": kind}})
    return out


def _write(path: Path, recs: list[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    tmp.replace(path)
    return len(recs)


def select_manifests(corpus: Path, out: Path, recipe: Recipe) -> dict[str, int]:
    """Write out/<stage>/{train,dev}.jsonl from the corpus under the recipe's clip quotas."""
    chosen = choose_clips(corpus, recipe.clips)
    counts = {}
    exclude = eval_questions(corpus)
    for stage in STAGES:
        train = [r for r in load_records(corpus / stage / "train.jsonl") if set(_audio(r)) <= chosen]
        if stage == "sft" and recipe.spoken_qa_repeat > 1:
            # Oversample the voice-chat mode: its answers must come from the audio alone, and
            # 800 SFT steps showed each spoken question ~0.6 times (docs/lalm-tiny.md).
            train = [x for r in train for x in [r] * (recipe.spoken_qa_repeat if spoken_only(r) else 1)]
        if stage == "sft" and recipe.asr_repeat > 1:
            # Hold transcription up against the other tasks: with 15,000 spoken questions the
            # transcription lines fell to 6% of SFT and the others leaked into them (channel
            # names spelt as letters; docs/lalm-tiny.md, stop 19).
            train = [x for r in train for x in [r] * (recipe.asr_repeat if r.get("task") == "asr" else 1)]
        if stage == "pretrain" and recipe.pretrain_chat:
            # Some pre-training in the Instruct template: the chat-format transcription SFT and
            # evaluation use then starts from what pre-training learnt (docs/lalm-tiny.md, stop 17).
            pick = random.Random(recipe.corpus_seed + 17)
            train = [{**r, "format": "chat"} if pick.random() < recipe.pretrain_chat else r for r in train]
        if stage == "sft" and recipe.text_qa:
            train += text_questions(recipe.text_qa, recipe.text_qa_seed, exclude)
        dev = load_records(corpus / stage / "dev.jsonl")
        random.Random(recipe.corpus_seed).shuffle(dev)
        counts[f"{stage}/train"] = _write(out / stage / "train.jsonl", train)
        counts[f"{stage}/dev"] = _write(out / stage / "dev.jsonl", dev[: recipe.dev_records])
    return counts


def manifest_texts(paths: list[Path]) -> list[str]:
    """Every text of some manifests (prompts, answers, preference pairs): the BPE training text."""
    texts, seen = [], set()
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            if line in seen:  # a repeated line (spoken_qa_repeat) is one text
                continue
            seen.add(line)
            rec = json.loads(line)
            for m in rec["messages"]:
                c = m["content"]
                texts.append(c if isinstance(c, str) else " ".join(p.get("text", "") for p in c))
            texts += [rec[k] for k in ("chosen", "rejected") if k in rec]
    return texts
